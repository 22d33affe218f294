"""`python -m eval.hallucination`: hallucination benchmarks of the plain model and of steered ones.

  python -m eval.hallucination --model=llava-hf/llama3-llava-next-8b-hf \
      --questions=POPE/output/coco/coco_pope_adversarial.json --image_root=coco/val2014 \
      --sae=EXPORT/model.layers.24 --latents=36992 --mode=add_scaled --strengths=-0.2,-0.1 \
      --positions=generated --out=results/pope_adversarial

--task=pope (default): yes/no questions (eval/pope.py), answers parsed with POPE's rule and scored
by accuracy, precision, recall, F1 ("yes" positive) and the yes ratio.
--task=chair: captions of `{image, objects}` items (eval/chair.py) scored by CHAIR_i, CHAIR_s,
recall and length against an object vocabulary.

Every item is answered greedily by the plain model, then once per steering run (`--values`: one
run; `--strengths`: a sweep; interpret/steering.py has the modes and positions), in left-padded
batches. Writes OUT/results.json, OUT/results.md (a table) and OUT/answers.jsonl (every raw
answer); prints the table and a one-line JSON summary last.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Callable

import tqdm
from absl import flags
from PIL import Image

from eval import chair, pope
from harvest import images, llava
from harvest.hooks import HookError
from interpret import steering
from sae_jax import cli
from sae_jax.store import atomic_write_json

_TASK = flags.DEFINE_enum("task", "pope", ["pope", "chair"], "pope: yes/no questions; chair: "
                          "captions scored against ground-truth objects.")
_LLAVA = llava.define_flags()  # --model --dtype --device --prompt_mode
_QUESTIONS = flags.DEFINE_string("questions", None, "JSONL items. pope: {image, question | text, "
                                 "label} (the official POPE files load as they are); chair: "
                                 "{image, objects, prompt (optional)}.", required=True)
_IMAGE_ROOT = flags.DEFINE_string("image_root", None, "Folder the image paths are relative to "
                                  "(default: the question file's folder).")
_OUT = flags.DEFINE_string("out", None, "Output folder.", required=True)
steering.define_flags()  # --sae --layer --latents --mode --values --strengths --positions
_SUFFIX = flags.DEFINE_string("question_suffix", "", "pope: appended to every question, e.g. ' "
                              "Please answer yes or no.' (POPE itself adds nothing).")
_CAPTION_PROMPT = flags.DEFINE_string("caption_prompt", "Please describe this image in detail.",
                                      "chair: prompt of the items without their own.")
_VOCABULARY = flags.DEFINE_string("vocabulary", None, "chair: synonyms file (the reference's "
                                  "data/synonyms.txt): one object per line, names separated by "
                                  "', ', canonical name first (default: the items' object names).")
_MAX_QUESTIONS = flags.DEFINE_integer("max_questions", 0, "Only the first N items (0: all).",
                                      lower_bound=0)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Items per generate call.", lower_bound=1)
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 0, "Answer length (0: 16 for pope, "
                                       "which reads the first sentence; 512 for chair).",
                                       lower_bound=0)

FLAGS = flags.FLAGS
flags.adopt_module_key_flags(llava)  # --help lists the shared flags too
flags.adopt_module_key_flags(steering)
USER_ERRORS = (pope.QuestionError, steering.SteeringError, HookError, llava.ModelError,
               images.BadImage)


@dataclasses.dataclass(frozen=True)
class Task:
  """What differs between benchmarks: items, prompts, scoring and the table's columns."""
  read: Callable[[str, str | None], list]  # (path, image root) -> items with an `image` path
  prompt: Callable[[object], str]
  score: Callable[[list, list[str]], tuple[dict, list[dict]]]  # -> metrics, one record per answer
  columns: tuple[str, ...]  # shown as percentages, except "length"
  max_new_tokens: int


def score_pope(questions: list[pope.Question], answers: list[str]) -> tuple[dict, list[dict]]:
  parsed = [pope.parse_answer(a) for a in answers]
  records = [{"question_id": q.question_id, "image": str(q.image), "question": q.question,
              "label": q.label, "answer": a, "parsed": p}
             for q, a, p in zip(questions, answers, parsed)]
  return pope.metrics(parsed, [q.label for q in questions]), records


def chair_scorer(vocabulary: chair.Vocabulary | None):
  """Scores captions against `vocabulary` (None: the items' own object names)."""
  def score(items: list[chair.CaptionItem], answers: list[str]) -> tuple[dict, list[dict]]:
    vocab = vocabulary or chair.vocabulary_of(items)
    records = [{"image": str(item.image), "objects": list(item.objects), "answer": answer,
                "mentions": chair.mentions(answer, vocab)} for item, answer in zip(items, answers)]
    return chair.scores(answers, [item.objects for item in items], vocab), records
  return score


def make_task(name: str) -> Task:
  """The task of --task; a --vocabulary is read now, so that a bad one fails before any work."""
  if name == "pope":
    return Task(pope.read_questions, lambda q: q.question + _SUFFIX.value, score_pope,
                ("accuracy", "precision", "recall", "f1", "yes_ratio"), 16)
  vocabulary = chair.read_vocabulary(_VOCABULARY.value) if _VOCABULARY.value else None
  return Task(chair.read_items, lambda item: item.prompt or _CAPTION_PROMPT.value,
              chair_scorer(vocabulary), ("chair_s", "chair_i", "recall", "length"), 512)


def load_image(item, row: int) -> Image.Image:
  try:
    return images.decode_image(lambda: Image.open(item.image))
  except images.BadImage as e:
    raise images.BadImage(f"--questions={_QUESTIONS.value} row {row + 1}: image "
                          f"{item.image}: {e}") from e


def answer_all(loaded: llava.LoadedModel, task: Task, items: list, desc: str) -> list[str]:
  answers = []
  size = _BATCH_SIZE.value
  max_new_tokens = _MAX_NEW_TOKENS.value or task.max_new_tokens
  for start in tqdm.tqdm(range(0, len(items), size), desc=desc, unit="batch"):
    batch = items[start:start + size]
    texts = [llava.prompt_text(loaded.processor, _LLAVA.prompt_mode.value, task.prompt(item))
             for item in batch]
    batch_images = [load_image(item, start + i) for i, item in enumerate(batch)]
    answers += steering.generate_texts(loaded, batch_images, texts, max_new_tokens)
  return answers


def markdown(runs: list[dict], columns: tuple[str, ...]) -> str:
  lines = ["| run | " + " | ".join(columns) + " |", "| --- |" + " ---: |" * len(columns)]
  for run in runs:
    cells = " | ".join(f"{run[c]:.1f}" if c == "length" else f"{100 * run[c]:.2f}"
                       for c in columns)
    lines.append(f"| {run['label']} | {cells} |")
  return "\n".join(lines) + "\n"


def run() -> tuple[dict, list[dict], Task]:
  task = make_task(_TASK.value)
  configs = steering.configs_from_flags(FLAGS) if FLAGS.sae else []
  if not FLAGS.sae and (FLAGS.latents or FLAGS.values or FLAGS.strengths):
    raise steering.SteeringError("--latents/--values/--strengths need --sae")
  items = task.read(_QUESTIONS.value, _IMAGE_ROOT.value)
  if _MAX_QUESTIONS.value:
    items = items[:_MAX_QUESTIONS.value]
  for row, item in enumerate(items):  # fail before loading a large model
    if not item.image.is_file():
      raise images.BadImage(f"--questions={_QUESTIONS.value} row {row + 1}: image "
                            f"{item.image} does not exist (check --image_root)")
  loaded = _LLAVA.load()
  runs = [("plain", contextlib.nullcontext())]
  if configs:
    sae, layer = steering.load_sae(loaded, FLAGS.sae, FLAGS.layer)
    runs += [(f"{FLAGS.mode} {label}", steering.steering_for(
        loaded, sae, layer, edits, FLAGS.mode, FLAGS.positions)) for label, edits in configs]
  results, answer_rows = [], []
  for label, steer in runs:
    with steer:
      answers = answer_all(loaded, task, items, label)
    metrics, records = task.score(items, answers)
    results.append({"label": label, **metrics})
    answer_rows += [{"run": label, **record} for record in records]
  return {"task": _TASK.value, "model": _LLAVA.model.value, "questions": _QUESTIONS.value,
          "items": len(items), "sae": FLAGS.sae, "mode": FLAGS.mode if configs else None,
          "positions": FLAGS.positions if configs else None, "runs": results}, answer_rows, task


def main():
  result, answer_rows, task = run()
  out = Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  with open(out / "answers.jsonl", "w") as f:
    f.writelines(json.dumps(row) + "\n" for row in answer_rows)
  table = markdown(result["runs"], task.columns)
  (out / "results.md").write_text(table)
  atomic_write_json(out / "results.json", result)
  print(table, end="")
  print(json.dumps({"ok": True, "task": _TASK.value, "out": str(out), "items": result["items"],
                    "runs": {r["label"]: {c: round(r[c], 4) for c in task.columns}
                             for r in result["runs"]}}))


if __name__ == "__main__":
  cli.run(main, USER_ERRORS)
