"""`python -m eval.hallucination_latents`: find the latents that separate hallucinated from correct
answers, then steer them on held-out questions.

  python -m eval.hallucination_latents --model=llava-hf/llama3-llava-next-8b-hf \
      --questions=POPE/output/coco/coco_pope_adversarial.json --image_root=coco/val2014 \
      --sae=EXPORT/model.layers.24 --top=5 --mode=ablate --out=results/pope_latents

The items (--task=pope or hallusionbench, read as eval.hallucination reads them) are split by
--seed into a discovery share (--split) and the held-out rest. Discovery: the plain model answers
greedily; one teacher-forced forward pass over prompt + its first generated token records the SAE's
activations at the hookpoint at that token ("first") and their mean over the image tokens
("image"; items without an image have none). An answer is hallucinated (label 1) when POPE's parsed
answer differs from the label, or when the HallusionBench judge does not call it correct. Every
latent gets the AUROC of its activation for hallucinated against correct answers at both places
(above 0.5: higher on hallucinated answers). The --top latents at --rank_by, highest AUROC first
(--direction=hallucinated) or lowest (correct), are then steered with --mode and --values or
--strengths (interpret/steering.py) on the held-out items, next to the plain model.

Writes OUT/latents.jsonl (every latent that fired, with both AUROCs), OUT/answers.jsonl,
OUT/results.json (the split, the chosen latents, each run's metrics and its change from plain with
a paired bootstrap 95% interval: the same resampled questions for both) and OUT/results.md; prints
one JSON line last.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import torch
from absl import flags

from eval import hallucination, pope
from eval import latent_separation as sep
from harvest import llava
from interpret import steering
from sae_jax import cli
from sae_jax.store import atomic_write_json

PLACES = ("first", "image")
_SPLIT = flags.DEFINE_float("split", 0.5, "Share of the items used to find the latents; the rest "
                            "are held out for steering.", lower_bound=0.0, upper_bound=1.0)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the split and of the bootstrap.")
_TOP = flags.DEFINE_integer("top", 5, "Latents steered together.", lower_bound=1)
_RANK_BY = flags.DEFINE_enum("rank_by", "first", PLACES, "AUROC that ranks the latents: at the "
                             "answer's first generated token, or of the mean over image tokens.")
_DIRECTION = flags.DEFINE_enum("direction", "hallucinated", ["hallucinated", "correct"],
                               "Steer the latents most active on hallucinated answers (highest "
                               "AUROC) or on correct ones (lowest).")
_RESAMPLES = flags.DEFINE_integer("resamples", 1000, "Bootstrap resamples.", lower_bound=1)

FLAGS = flags.FLAGS
flags.adopt_module_key_flags(hallucination)  # --help lists the benchmark and steering flags


def discover(loaded, sae, layer: int, task, items: list) -> tuple[list[str], np.ndarray,
                                                                   np.ndarray]:
  """Plain answers of the items and their [items, latents] activations at both places."""
  def record(loaded, batch_images, texts, max_new_tokens):
    answers, first, image = sep.answer_and_record(loaded, sae, layer, texts, batch_images,
                                                  max_new_tokens)
    return list(zip(answers, first.cpu(), image.cpu()))
  answers, first, image = zip(*hallucination.answer_all(loaded, task, items, "discovery", record))
  return list(answers), torch.stack(first).numpy(), torch.stack(image).numpy()


def run() -> dict:
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
  found, held = sep.split_items(len(items), _SPLIT.value, _SEED.value)
  if not len(found) or not len(held):
    raise pope.QuestionError(f"--split={_SPLIT.value} of {len(items)} items leaves a side empty")
  loaded = llava.load_llava(FLAGS.model, FLAGS.dtype, FLAGS.device)
  sae, layer = steering.load_sae(loaded, FLAGS.sae, FLAGS.layer)

  discovery_items = [items[i] for i in found]
  answers, first, image = discover(loaded, sae, layer, task, discovery_items)
  _, records = task.score(discovery_items, answers)
  hallucinated = sep.hallucinated_labels(FLAGS.task, records)
  if hallucinated.all() or not hallucinated.any():
    raise pope.QuestionError(f"the {len(found)} discovery answers are all "
                             f"{'hallucinated' if hallucinated.any() else 'correct'}: no AUROC")
  with_image = not np.isnan(image).all()
  aurocs = {"first": sep.latent_aurocs(first, hallucinated),
            "image": sep.latent_aurocs(image, hallucinated) if with_image else None}
  if aurocs[_RANK_BY.value] is None:
    raise pope.QuestionError("--rank_by=image but no discovery item has an image")
  chosen = sep.top_latents(aurocs[_RANK_BY.value], _TOP.value, _DIRECTION.value)

  held_items = [items[i] for i in held]
  runs = [("plain", contextlib.nullcontext())] + [
      (f"{FLAGS.mode} {label}", steering.steering_for(loaded, sae, layer, edits, FLAGS.mode,
                                                      FLAGS.positions))
      for label, edits in steering.configs_for_latents(FLAGS, chosen)]
  results, answer_rows, plain = [], [], None
  answer_rows += [{"run": "discovery", "hallucinated": bool(h), **r}
                  for r, h in zip(records, hallucinated)]
  for label, steer in runs:
    with steer:
      held_answers = hallucination.answer_all(loaded, task, held_items, label)
    metrics, held_records = task.score(held_items, held_answers)
    answer_rows += [{"run": label, **r} for r in held_records]
    arrays = sep.per_item(FLAGS.task, held_records)
    if label == "plain":
      plain = arrays
    change = None if label == "plain" else sep.compare(plain, arrays, _RESAMPLES.value,
                                                       _SEED.value)
    results.append({"label": label, **metrics, "change": change})
  return {"task": FLAGS.task, "model": FLAGS.model, "questions": FLAGS.questions, "sae": FLAGS.sae,
          "items": len(items), "seed": _SEED.value, "split": _SPLIT.value,
          "discovery": [int(i) for i in found], "held_out": [int(i) for i in held],
          "discovery_hallucinated": int(hallucinated.sum()), "rank_by": _RANK_BY.value,
          "direction": _DIRECTION.value, "mode": FLAGS.mode, "positions": FLAGS.positions,
          "latents": latent_rows(aurocs, chosen),
          "runs": results}, answer_rows, aurocs


def latent_rows(aurocs: dict, latents=None) -> list[dict]:
  """{latent, first, image} of `latents` (default: every latent that fired at either place, by
  index); None where there is no AUROC."""
  if latents is None:
    fired = np.isfinite(aurocs["first"])
    if aurocs["image"] is not None:
      fired |= np.isfinite(aurocs["image"])
    latents = np.flatnonzero(fired)
  value = lambda a, f: None if a is None or not np.isfinite(a[f]) else float(a[f])
  return [{"latent": int(f), **{p: value(a, f) for p, a in aurocs.items()}} for f in latents]


def markdown(result: dict) -> str:
  lines = ["| latent | AUROC first | AUROC image |", "| ---: | ---: | ---: |"]
  cell = lambda v: "-" if v is None else f"{v:.3f}"
  lines += [f"| {row['latent']} | {cell(row['first'])} | {cell(row['image'])} |"
            for row in result["latents"]]
  lines += ["", "| run | metric | plain | steered | change (95% CI) |",
            "| --- | --- | ---: | ---: | ---: |"]
  for run in result["runs"][1:]:
    for name, c in run["change"].items():
      lines.append(f"| {run['label']} | {name} | {100 * c['plain']:.2f} | "
                   f"{100 * c['steered']:.2f} | {100 * c['delta']:+.2f} "
                   f"({100 * c['ci95'][0]:+.2f}, {100 * c['ci95'][1]:+.2f}) |")
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
                    "runs": {r["label"]: {k: round(v["delta"], 4) for k, v in r["change"].items()}
                             for r in result["runs"][1:]}}))


if __name__ == "__main__":
  cli.run(main, hallucination.USER_ERRORS)
