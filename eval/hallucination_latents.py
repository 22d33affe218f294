"""`python -m eval.hallucination_latents`: find the latents that separate hallucinated from correct
answers, check them on held-out images, then steer them there.

  python -m eval.hallucination_latents --model=llava-hf/llama3-llava-next-8b-hf \
      --questions=POPE/output/coco/coco_pope_adversarial.json --image_root=coco/val2014 \
      --sae=EXPORT/model.layers.24 --top=5 --mode=ablate --out=results/pope_latents

The items (--task=pope or hallusionbench, read as eval.hallucination reads them) are split by
--seed into discovery and held-out by image (POPE's image file, HallusionBench's figure): --split of
the images, with all their questions, go to discovery, so no image is on both sides. The plain
model answers every item greedily; one teacher-forced forward pass over prompt + its first generated
token records the SAE's activations at three places (latent_separation.PLACES): "last_prompt", the
last prompt position, whose state decides the answer (the default); "answer", the generated answer
token (it encodes the answer given, so a latent for "yes" separates errors that lean one way);
"image", the mean over the image tokens (items without an image have none).

Errors (latent_separation.ERRORS): "false_yes" (a wrong answer where the truth is no: object
hallucination) against the right answers there, "false_no" the same where the truth is yes, and
"wrong" (any error; it mixes both). Every latent gets the discovery AUROC of its activation for each
error and place (above 0.5: higher on the error). The --top latents by --error at --rank_by, highest
AUROC first (--direction=hallucinated) or lowest (correct), are chosen; their held-out AUROC (the
plain answers on held-out images) is reported with a cluster-bootstrap 95% interval (images
resampled). They are then steered on the held-out items with --mode and --values or --strengths
(interpret/steering.py), all together and one by one, next to the plain model; each change has a
paired cluster-bootstrap interval (the same resampled images for both arms).

Writes OUT/latents.jsonl (every latent that fired: its AUROC per error and place),
OUT/answers.jsonl, OUT/results.json (the split, the chosen latents with discovery and held-out AUROC,
each run's metrics and change from plain) and OUT/results.md; prints one JSON line last.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from absl import flags

from eval import hallucination
from eval.tasks import pope
from eval.metrics import latent_separation as sep
from harvest import llava
from interpret import steering
from sae_jax import cli
from sae_jax.files import atomic_write_json

_SPLIT = flags.DEFINE_float("split", 0.5, "Share of the images (POPE) or figures (HallusionBench) "
                            "whose items find the latents; the rest are held out.",
                            lower_bound=0.0, upper_bound=1.0)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the split and of the bootstrap.")
_TOP = flags.DEFINE_integer("top", 5, "Latents chosen (steered together and one by one).",
                            lower_bound=1)
_RANK_BY = flags.DEFINE_enum("rank_by", "last_prompt", list(sep.PLACES), "Place whose AUROC ranks "
                             "the latents: the last prompt position (the state that decides the "
                             "answer), the generated answer token, or the mean over image tokens.")
_ERROR = flags.DEFINE_enum("error", "false_yes", list(sep.ERRORS), "Error the latents separate: a "
                           "false yes (object hallucination), a false no, or any wrong answer.")
_DIRECTION = flags.DEFINE_enum("direction", "hallucinated", ["hallucinated", "correct"],
                               "Steer the latents most active on the errors (highest AUROC) or on "
                               "correct answers (lowest).")
_RESAMPLES = flags.DEFINE_integer("resamples", 1000, "Bootstrap resamples.", lower_bound=1)

FLAGS = flags.FLAGS
flags.adopt_module_key_flags(hallucination)  # --help lists the benchmark and steering flags


def record_plain(loaded, sae, layer: int, task, items: list, desc: str) -> tuple[list[str], dict]:
  """Plain answers of the items and their [items, latents] activations at each place."""
  def record(loaded, batch_images, texts, max_new_tokens):
    answers, places = sep.answer_and_record(loaded, sae, layer, texts, batch_images,
                                            max_new_tokens)
    return [(a, {p: v[i].cpu() for p, v in places.items()}) for i, a in enumerate(answers)]
  answers, places = zip(*hallucination.answer_all(loaded, task, items, desc, record))
  return list(answers), {p: torch.stack([row[p] for row in places]).numpy() for p in sep.PLACES}


def all_aurocs(places: dict, labels: dict) -> dict:
  """{(error, place): [latents] AUROC} (None for image when no item has one)."""
  return {(error, place): (None if place == "image" and np.isnan(acts).all()
                           else sep.latent_aurocs(acts, labels[error]))
          for error in sep.ERRORS for place, acts in places.items()}


def run() -> tuple[dict, list[dict], dict]:
  """(results, answer rows, discovery AUROCs by (error, place))."""
  if FLAGS.task == "chair":
    raise pope.QuestionError("--task=pope or hallusionbench: captions have no right answer")
  if not (FLAGS.questions and FLAGS.model and FLAGS.sae):
    raise pope.QuestionError("give --questions, --model and --sae")
  if FLAGS.latents or FLAGS.predictions:
    raise steering.SteeringError("the latents are found here: give no --latents or "
                                 "--predictions")
  steering.configs_for_latents(FLAGS, range(_TOP.value))  # bad --values fail before any work
  task = hallucination.make_task(FLAGS.task)
  items = task.read(FLAGS.questions, FLAGS.image_root)
  if FLAGS.max_questions:
    items = items[:FLAGS.max_questions]
  hallucination.check_images(items)
  groups = sep.group_keys(FLAGS.task, items)
  found, held = sep.split_items(groups, _SPLIT.value, _SEED.value)
  if not len(found) or not len(held):
    raise pope.QuestionError(f"--split={_SPLIT.value} of the {len(set(groups))} images of "
                             f"{len(items)} items leaves a side empty")
  loaded = llava.load_llava(FLAGS.model, FLAGS.dtype, FLAGS.device)
  sae, layer = steering.load_sae(loaded, FLAGS.sae, FLAGS.layer)

  discovery_items = [items[i] for i in found]
  answers, places = record_plain(loaded, sae, layer, task, discovery_items, "discovery")
  _, records = task.score(discovery_items, answers)
  labels = sep.error_labels(FLAGS.task, records)
  chosen_labels = labels[_ERROR.value]
  if np.nansum(chosen_labels) == 0 or np.nansum(chosen_labels) == np.isfinite(chosen_labels).sum():
    raise pope.QuestionError(f"--error={_ERROR.value}: the {len(found)} discovery answers have "
                             f"{'no ' if np.nansum(chosen_labels) == 0 else 'only '}such errors: "
                             "no AUROC")
  aurocs = all_aurocs(places, labels)
  ranking = aurocs[_ERROR.value, _RANK_BY.value]
  if ranking is None:
    raise pope.QuestionError("--rank_by=image but no discovery item has an image")
  chosen = sep.top_latents(ranking, _TOP.value, _DIRECTION.value)

  held_items = [items[i] for i in held]
  held_groups = [groups[i] for i in held]
  held_answers, held_places = record_plain(loaded, sae, layer, task, held_items, "plain")
  metrics, held_records = task.score(held_items, held_answers)
  held_labels = sep.error_labels(FLAGS.task, held_records)
  plain = sep.per_item(FLAGS.task, held_records)
  answer_rows = [{"run": "discovery", **{e: _label(labels[e][i]) for e in sep.ERRORS}, **r}
                 for i, r in enumerate(records)]
  answer_rows += [{"run": "plain", **r} for r in held_records]
  results = [{"label": "plain", "latents": [], **metrics, "change": None}]
  runs = [(f"{FLAGS.mode} {label}", chosen, edits)
          for label, edits in steering.configs_for_latents(FLAGS, chosen)]
  if len(chosen) > 1:
    runs += [(f"{FLAGS.mode} {label} latent {f}", [f], edits) for f in chosen
             for label, edits in steering.configs_for_latents(FLAGS, [f])]
  for label, latents, edits in runs:
    with steering.steering_for(loaded, sae, layer, edits, FLAGS.mode, FLAGS.positions):
      steered_answers = hallucination.answer_all(loaded, task, held_items, label)
    metrics, steered_records = task.score(held_items, steered_answers)
    answer_rows += [{"run": label, **r} for r in steered_records]
    results.append({"label": label, "latents": latents, **metrics,
                    "change": sep.compare(plain, sep.per_item(FLAGS.task, steered_records),
                                          held_groups, _RESAMPLES.value, _SEED.value)})
  latents = []
  for f in chosen:
    held_auroc = {place: sep.auroc_with_ci(acts[:, f], held_labels[_ERROR.value], held_groups,
                                           _RESAMPLES.value, _SEED.value)
                  for place, acts in held_places.items() if not np.isnan(acts).all()}
    latents.append({"latent": f, "discovery_auroc": _value(ranking, f),
                    "heldout_auroc": held_auroc[_RANK_BY.value]["auroc"],
                    "heldout_ci95": held_auroc[_RANK_BY.value]["ci95"],
                    "heldout_by_place": held_auroc,
                    "discovery": {f"{e}/{p}": _value(a, f) for (e, p), a in aurocs.items()},
                    "runs": [r["label"] for r in results if r["latents"] == [f]]})
  return {"task": FLAGS.task, "model": FLAGS.model, "questions": FLAGS.questions, "sae": FLAGS.sae,
          "items": len(items), "images": len(set(groups)), "seed": _SEED.value,
          "split": _SPLIT.value, "discovery": [int(i) for i in found],
          "held_out": [int(i) for i in held],
          "discovery_errors": {e: int(np.nansum(labels[e])) for e in sep.ERRORS},
          "heldout_errors": {e: int(np.nansum(held_labels[e])) for e in sep.ERRORS},
          "rank_by": _RANK_BY.value, "error": _ERROR.value, "direction": _DIRECTION.value,
          "mode": FLAGS.mode, "positions": FLAGS.positions, "latents": latents,
          "runs": results}, answer_rows, aurocs


def _label(value: float) -> bool | None:
  return None if np.isnan(value) else bool(value)


def _value(aurocs: np.ndarray | None, latent: int) -> float | None:
  return None if aurocs is None or not np.isfinite(aurocs[latent]) else float(aurocs[latent])


def latent_rows(aurocs: dict) -> list[dict]:
  """{latent, "<error>/<place>": AUROC or None} of every latent that fired at some place."""
  fired = np.any([np.isfinite(a) for a in aurocs.values() if a is not None], axis=0)
  return [{"latent": int(f), **{f"{e}/{p}": _value(a, f) for (e, p), a in aurocs.items()}}
          for f in np.flatnonzero(fired)]


def _ci(c: list | None, scale: float = 1.0, sign: str = "") -> str:
  return "-" if c is None else f"({scale * c[0]:{sign}.3f}, {scale * c[1]:{sign}.3f})"


def markdown(result: dict) -> str:
  error, place = result["error"], result["rank_by"]
  cell = lambda v: "-" if v is None else f"{v:.3f}"
  by_label = {r["label"]: r for r in result["runs"]}
  other = "answer" if place != "answer" else "last_prompt"
  lines = [f"Latents chosen by the discovery AUROC of {error} at {place}; held-out: the plain "
           "answers on held-out images (cluster bootstrap by image).", "",
           f"| latent | discovery AUROC | held-out AUROC (95% CI) | held-out AUROC at {other} | "
           f"run | change in {error}_rate (95% CI) | change in accuracy (95% CI) |",
           "| ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
  rate = "false_no_rate" if error == "false_no" else "false_yes_rate"
  for row in result["latents"]:
    for label in row["runs"] or ["-"]:
      change = by_label[label]["change"] if label in by_label else None
      delta = lambda name: ("-" if not change or change[name]["delta"] is None else
                            f"{100 * change[name]['delta']:+.2f} "
                            f"{_ci(change[name]['ci95'], 100, '+')}")
      at_other = row["heldout_by_place"][other]
      lines.append(f"| {row['latent']} | {cell(row['discovery_auroc'])} | "
                   f"{cell(row['heldout_auroc'])} {_ci(row['heldout_ci95'])} | "
                   f"{cell(at_other['auroc'])} {_ci(at_other['ci95'])} | {label} | "
                   f"{delta(rate) if error != 'wrong' else '-'} | {delta('accuracy')} |")
  lines += ["", "| run | metric | plain | steered | change (95% CI) |",
            "| --- | --- | ---: | ---: | ---: |"]
  for run in result["runs"][1:]:
    for name, c in run["change"].items():
      pct = lambda v: "-" if v is None or not np.isfinite(v) else f"{100 * v:.2f}"
      lines.append(f"| {run['label']} | {name} | {pct(c['plain'])} | {pct(c['steered'])} | "
                   f"{100 * c['delta']:+.2f} {_ci(c['ci95'], 100, '+')} |"
                   if np.isfinite(c["delta"]) else
                   f"| {run['label']} | {name} | {pct(c['plain'])} | {pct(c['steered'])} | - |")
  return "\n".join(lines) + "\n"


def main():
  out = Path(FLAGS.out)
  out.mkdir(parents=True, exist_ok=True)
  result, answer_rows, aurocs = run()
  with open(out / "latents.jsonl", "w") as f:
    f.writelines(json.dumps(row) + "\n" for row in latent_rows(aurocs))
  with open(out / "answers.jsonl", "w") as f:
    f.writelines(json.dumps(row) + "\n" for row in answer_rows)
  table = markdown(result)
  (out / "results.md").write_text(table)
  atomic_write_json(out / "results.json", result)
  print(table, end="")
  print(json.dumps({"ok": True, "task": result["task"], "out": str(out),
                    "latents": [row["latent"] for row in result["latents"]],
                    "runs": {r["label"]: {k: None if not np.isfinite(v["delta"]) else
                                          round(v["delta"], 4) for k, v in r["change"].items()}
                             for r in result["runs"][1:]}}))


if __name__ == "__main__":
  cli.run(main, hallucination.USER_ERRORS)
