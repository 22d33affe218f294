"""`python -m interpret.steer`: generations with and without steering, side by side.

  python -m interpret.steer --model=llava-hf/llama3-llava-next-8b-hf \
      --sae=EXPORT/model.layers.24 --latents=36992 --mode=add --strengths=-20,-10,10 \
      --positions=all --image=cat.jpg --prompt="Describe the image."

One greedy generation without steering, then one per steering run (interpret/steering.py has the
modes and positions): --values gives one run with latent i at values[i]; --strengths a sweep, one
run per strength with every latent at it; --mode=ablate needs neither. Writes every generation to
--out (JSON) when given, prints them side by side, and a one-line JSON summary last.
"""

from __future__ import annotations

import json
from pathlib import Path

import tqdm
from absl import flags
from PIL import Image

from harvest import images, llava
from harvest.hooks import HookError
from interpret import steering
from sae_jax import cli
from sae_jax.files import atomic_write_json

_LLAVA = llava.define_flags()  # --model --dtype --device --prompt_mode
steering.define_flags()  # --sae --layer --latents --mode --values --strengths --positions
_PROMPT = flags.DEFINE_string("prompt", None, "The prompt text.", required=True)
_IMAGE = flags.DEFINE_string("image", None, "Optional image file shown with the prompt.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 64, "Tokens generated per run.",
                                       lower_bound=1)
_OUT = flags.DEFINE_string("out", None, "JSON file for the generations (optional).")

FLAGS = flags.FLAGS
flags.adopt_module_key_flags(llava)  # --help lists the shared flags too
flags.adopt_module_key_flags(steering)
USER_ERRORS = (steering.SteeringError, HookError, llava.ModelError, images.BadImage)


def run() -> dict:
  if not FLAGS.sae:
    raise steering.SteeringError("--sae is required")
  configs = steering.configs_from_flags(FLAGS)
  image = None
  if _IMAGE.value:
    try:
      image = images.decode_image(lambda: Image.open(_IMAGE.value))
    except images.BadImage as e:
      raise images.BadImage(f"--image={_IMAGE.value}: {e}") from e
  loaded = _LLAVA.load()
  sae, layer = steering.load_sae(loaded, FLAGS.sae, FLAGS.layer)
  text = llava.prompt_text(loaded.processor, _LLAVA.prompt_mode.value, _PROMPT.value,
                           with_image=image is not None)
  batch_images = [image] if image is not None else None

  def generate() -> str:
    return steering.generate_texts(loaded, batch_images, [text], _MAX_NEW_TOKENS.value)[0]

  baseline = generate()
  runs = []
  for label, edits in tqdm.tqdm(configs, desc="steering runs", disable=len(configs) < 2):
    with steering.steering_for(loaded, sae, layer, edits, FLAGS.mode, FLAGS.positions) as steer:
      generated = generate()
    runs.append({"label": label, "edits": [{"latent": e.latent, "value": e.value} for e in edits],
                 "text": generated, "differs": generated != baseline,
                 "edited_positions": steer.edited_positions})
  return {"model": _LLAVA.model.value, "sae": FLAGS.sae, "layer": layer, "mode": FLAGS.mode,
          "positions": FLAGS.positions, "prompt": _PROMPT.value, "image": _IMAGE.value,
          "max_new_tokens": _MAX_NEW_TOKENS.value, "baseline": baseline, "runs": runs}


def main():
  result = run()
  if _OUT.value:
    atomic_write_json(Path(_OUT.value), result)
  print(f"[no steering] {result['baseline']!r}")
  for r in result["runs"]:
    print(f"[{result['mode']} {r['label']}] {r['text']!r}")
  print(json.dumps({"ok": True, "out": _OUT.value, "layer": result["layer"],
                    "runs": len(result["runs"]),
                    "changed": sum(r["differs"] for r in result["runs"])}))


if __name__ == "__main__":
  cli.run(main, USER_ERRORS)
