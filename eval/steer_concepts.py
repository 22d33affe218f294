"""`python -m eval.steer_concepts`: does clamping a colour's latent make the model say that colour?

  python -m eval.steer_concepts --model=WORLD/subject --sae=EXPORT/<hookpoint> \
      --concepts=CONCEPTS --images=IMAGES --topacts=TOPACTS --out=STEER

Ground truth for steering, on scenes whose colours are known (harvest.images' concepts.jsonl).
For each colour concept that eval.concepts matched to a latent (CONCEPTS/concepts.json), the
latent is clamped (interpret.steering, --mode at --positions) to --scale times its top activation
(TOPACTS) on the images (of the first --pool, at most --max_images) that do not show the colour,
and the model's caption (greedy, --prompt in the model's chat template) is read: a success is a caption that names the colour, which the
unsteered caption did not. The control clamps random latents by the same rule (--scale times
each one's own top activation) on the same images and counts the same colour word: per colour,
--random_latents latents drawn uniformly from those with top images that eval.concepts did not
match to that colour (CONCEPTS/per_latent.jsonl: best concept the colour at IoU >= its
--match_iou), the images dealt among them in turn. Several draws per colour, because one latent
that happens to fire on the colour, or to blot out the image, would otherwise decide the rate.
Writes:
  steer_concepts.json   settings, per colour {latent, value, images, changed, random_latents,
                        random_values, random_changed}, pooled rates with 95% Wilson intervals
  captions.jsonl        every caption: image, colour, baseline, steered, random, random_latent
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from absl import flags

from harvest import images as images_lib
from harvest import llava
from harvest.hooks import HookError
from interpret import steering
from interpret import topacts as topacts_lib
from sae_jax import cli
from sae_jax.files import atomic_write_bytes, atomic_write_json

FORMAT_NAME, FORMAT_VERSION = "steer-concepts", 2

_LLAVA = llava.define_flags(dtype="float32")  # --model --dtype --device --prompt_mode
steering.define_sae_flags()  # --sae --layer
_CONCEPTS = flags.DEFINE_string("concepts", None, "Output folder of eval.concepts.", required=True)
_IMAGES = flags.DEFINE_string("images", None, "Folder of harvest.images with concepts.jsonl.",
                              required=True)
_TOPACTS = flags.DEFINE_string("topacts", None, "TOPACTS folder: each latent's top activation "
                               "sets its clamp value.", required=True)
_OUT = flags.DEFINE_string("out", None, "Output folder (see the module doc).", required=True)
_PROMPT = flags.DEFINE_string("prompt", "Describe the image.", "The prompt text.")
_MODE = flags.DEFINE_enum("mode", "clamp", list(steering.MODES), "Steering mode.")
_POSITIONS = flags.DEFINE_enum("positions", "image", list(steering.POSITIONS),
                               "Positions edited.")
_SCALE = flags.DEFINE_float("scale", 1.0, "Clamp value as a multiple of the latent's top "
                            "activation.")
_POOL = flags.DEFINE_integer("pool", 128, "The first N scenes of --images are captioned without "
                             "steering; each colour is tried on those of them without it.",
                             lower_bound=1)
_MAX_IMAGES = flags.DEFINE_integer("max_images", 64, "Images tried per colour (those without it).",
                                   lower_bound=1)
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 12, "Caption length in tokens.",
                                       lower_bound=1)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Images per generate call.", lower_bound=1)
_RANDOM_LATENTS = flags.DEFINE_integer("random_latents", 8, "Random latents per colour (the "
                                      "control); the colour's images are dealt among them.",
                                      lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random latents.")

FLAGS = flags.FLAGS
flags.adopt_module_key_flags(llava)
flags.adopt_module_key_flags(steering)  # --sae, --layer
USER_ERRORS = (steering.SteeringError, HookError, llava.ModelError, images_lib.BadImage,
               topacts_lib.TopActsError, OSError, json.JSONDecodeError, KeyError)


def wilson(successes: int, trials: int, z: float = 1.96) -> list[float] | None:
  """95% Wilson score interval of a proportion (None without trials)."""
  if not trials:
    return None
  p = successes / trials
  centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
  half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
  return [centre - half, centre + half]


def top_activation(acts: topacts_lib.TopActs, latent: int) -> float:
  return float(np.max(acts.latent(latent).maps))


def _captions(loaded, pictures, text, edits, sae, layer) -> list[str]:
  out = []
  for start in range(0, len(pictures), _BATCH_SIZE.value):
    chunk = pictures[start:start + _BATCH_SIZE.value]
    if edits:
      with steering.steering_for(loaded, sae, layer, edits, _MODE.value, _POSITIONS.value):
        out += steering.generate_texts(loaded, chunk, [text] * len(chunk), _MAX_NEW_TOKENS.value)
    else:
      out += steering.generate_texts(loaded, chunk, [text] * len(chunk), _MAX_NEW_TOKENS.value)
  return [c.strip().lower() for c in out]


def names(caption: str, colour: str) -> bool:
  return colour in caption.split()


def matched_to(per_latent: list[dict], concept: str, match_iou: float) -> set[int]:
  """Latents whose best concept (eval.concepts) is `concept` at IoU >= match_iou."""
  return {int(r["latent"]) for r in per_latent
          if r["concept"] == concept and r["iou"] is not None and r["iou"] >= match_iou}


def dealt(items: list, groups: int) -> list[list]:
  """items dealt in turn into `groups` lists (item i into list i % groups)."""
  return [items[g::groups] for g in range(groups)]


def main():
  if not FLAGS.sae:
    raise steering.SteeringError("--sae is required")
  summary_in = json.loads((Path(_CONCEPTS.value) / "concepts.json").read_text())
  scenes = {record["image"]: record for record in map(json.loads, (
      Path(_IMAGES.value) / images_lib.CONCEPTS_FILE).read_text().splitlines())}
  acts = topacts_lib.TopActs(_TOPACTS.value)
  matched = {name.split(":", 1)[1]: c["latent"] for name, c in summary_in["concepts"].items()
             if name.startswith("colour:") and c["matched"]}
  per_latent = [json.loads(line) for line in
                (Path(_CONCEPTS.value) / "per_latent.jsonl").read_text().splitlines()]
  match_iou = summary_in["settings"]["match_iou"]
  with_images = [int(i) for i in np.flatnonzero(acts.has_images())]
  rng = np.random.default_rng(_SEED.value)
  loaded = _LLAVA.load()
  sae, layer = steering.load_sae(loaded, FLAGS.sae, FLAGS.layer)
  text = llava.prompt_text(loaded.processor, _LLAVA.prompt_mode.value, _PROMPT.value)
  folder = Path(_IMAGES.value)
  files = sorted(scenes)[:_POOL.value]
  pictures = {f: images_lib.decode_image(lambda f=f: images_lib.Image.open(folder / f))
              for f in files}
  baseline = dict(zip(files, _captions(loaded, [pictures[f] for f in files], text, [], sae, layer)))
  per_colour, lines = {}, []
  for colour, latent in sorted(matched.items()):
    absent = [f for f in files
              if colour not in {s["colour"] for s in scenes[f]["shapes"]}
              and not names(baseline[f], colour)][:_MAX_IMAGES.value]
    others = sorted(set(with_images) - matched_to(per_latent, f"colour:{colour}", match_iou))
    if not others:
      raise steering.SteeringError(f"--topacts={_TOPACTS.value}: no latent with top images is "
                                   f"left for the random control of {colour}")
    randoms = [int(i) for i in rng.choice(others, min(_RANDOM_LATENTS.value, len(others)),
                                          replace=False)]
    random_values = [_SCALE.value * top_activation(acts, i) for i in randoms]
    value = _SCALE.value * top_activation(acts, latent)
    steered = _captions(loaded, [pictures[f] for f in absent], text,
                        [steering.Edit(latent, value)], sae, layer)
    control, control_latent = {}, {}
    for random_latent, random_value, group in zip(randoms, random_values,
                                                  dealt(absent, len(randoms))):
      captions = _captions(loaded, [pictures[f] for f in group], text,
                           [steering.Edit(random_latent, random_value)], sae, layer)
      control.update(zip(group, captions))
      control_latent.update(dict.fromkeys(group, random_latent))
    per_colour[colour] = {
        "latent": latent, "value": value, "images": len(absent),
        "changed": sum(names(c, colour) for c in steered),
        "random_latents": randoms, "random_values": random_values,
        "random_changed": sum(names(control[f], colour) for f in absent)}
    lines += [{"image": f, "colour": colour, "baseline": baseline[f], "steered": s,
               "random": control[f], "random_latent": control_latent[f]}
              for f, s in zip(absent, steered)]
  trials = sum(c["images"] for c in per_colour.values())
  changed = sum(c["changed"] for c in per_colour.values())
  random_changed = sum(c["random_changed"] for c in per_colour.values())
  summary = {
      "format": FORMAT_NAME, "version": FORMAT_VERSION,
      "settings": {"model": _LLAVA.model.value, "sae": FLAGS.sae, "layer": layer,
                   "mode": _MODE.value, "positions": _POSITIONS.value, "scale": _SCALE.value,
                   "prompt": _PROMPT.value, "pool": _POOL.value, "max_images": _MAX_IMAGES.value,
                   "random_latents": _RANDOM_LATENTS.value, "seed": _SEED.value},
      "colours": len(per_colour), "trials": trials,
      "changed_rate": changed / trials if trials else None, "changed_ci": wilson(changed, trials),
      "random_rate": random_changed / trials if trials else None,
      "random_ci": wilson(random_changed, trials), "per_colour": per_colour}
  out = Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  atomic_write_bytes(out / "captions.jsonl",
                     "".join(json.dumps(line) + "\n" for line in lines).encode())
  atomic_write_json(out / "steer_concepts.json", summary)
  print(json.dumps({"ok": True, "colours": len(per_colour), "trials": trials,
                    "changed_rate": summary["changed_rate"],
                    "random_rate": summary["random_rate"], "out": str(out)}))


if __name__ == "__main__":
  cli.run(main, USER_ERRORS)
