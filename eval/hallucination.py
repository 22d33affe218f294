"""`python -m eval.hallucination`: hallucination benchmarks of the plain model and of steered ones.

  python -m eval.hallucination --model=llava-hf/llama3-llava-next-8b-hf \
      --questions=POPE/output/coco/coco_pope_adversarial.json --image_root=coco/val2014 \
      --sae=EXPORT/model.layers.24 --latents=36992 --mode=add_scaled --strengths=-0.2,-0.1 \
      --positions=generated --out=results/pope_adversarial

--task=pope (default): yes/no questions (eval/tasks/pope.py), answers parsed with POPE's rule and scored
by accuracy, precision, recall, F1 ("yes" positive) and the yes ratio.
--task=chair: captions of `{image, objects}` items (eval/tasks/chair.py) scored by CHAIR_i, CHAIR_s,
recall and length against an object vocabulary.
--task=hallusionbench: the official HallusionBench.json (eval/tasks/hallusionbench.py), questions with a
null filename asked without an image; answers judged by --judge (rule, or an LLM against
gt_answer_details) and scored by aAcc, fAcc, qAcc and easy/hard question-pair accuracy, in percent.
Each run's answers also go to the official result file, OUT/HallusionBench_result.json (plain) and
OUT/HallusionBench_result_<run>.json (steered), which the official evaluation.py reads, and which

  python -m eval.hallucination --task=hallusionbench --predictions=HallusionBench_result.json \
      --out=DIR

re-scores without a model (any file with `model_prediction`, ours or another's), printing one JSON
line with the metrics.

Every item is answered greedily by the plain model, then once per steering run (`--values`: one
run; `--strengths`: a sweep; interpret/steering.py has the modes and positions), in left-padded
batches. Writes OUT/results.json, OUT/results.md (a table) and OUT/answers.jsonl (every raw
answer); prints the table and a one-line JSON summary last.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from pathlib import Path
from typing import Callable

import torch
import tqdm
from absl import flags
from PIL import Image

from eval.tasks import chair, hallusionbench, pope
from harvest import images, llava
from harvest.hooks import HookError
from interpret import explainers, jobs, llm_flags, prompts, steering
from sae_jax import cli
from sae_jax.files import atomic_write_json

_TASK = flags.DEFINE_enum("task", "pope", ["pope", "chair", "hallusionbench"], "pope: yes/no "
                          "questions; chair: captions scored against ground-truth objects; "
                          "hallusionbench: the official HallusionBench.json.")
# --model --dtype --device --prompt_mode; --model is needed unless --predictions
_LLAVA = llava.define_flags(model_required=False)
_QUESTIONS = flags.DEFINE_string("questions", None, "Items. pope: JSONL {image, question | text, "
                                 "label} (the official POPE files load as they are); chair: JSONL "
                                 "{image, objects, prompt (optional)}; hallusionbench: the "
                                 "official HallusionBench.json.")
_PREDICTIONS = flags.DEFINE_string("predictions", None, "hallusionbench: re-score this result "
                                   "file (rows with model_prediction) without a model.")
_JUDGE = llm_flags.define_endpoint(
    "judge", "hallusionbench: rule (yes/no/uncertain from the answer's words), or an LLM judge "
    "against gt_answer_details: openai:http://host:port/v1 (any chat model) or hf:PATH (an "
    "image-text checkpoint, as interpret.explain loads it).", default="rule",
    model_help="(default: the server's only model)")
flags.adopt_module_key_flags(llm_flags)  # so that --help lists them as this command's
_JUDGE_TEMPLATE = flags.DEFINE_string("judge_template", None, "Judge prompt template (default: "
                                      "eval/templates/hallusionbench_judge.txt).")
_JUDGE_CONCURRENCY = flags.DEFINE_integer("judge_concurrency", 16, "Judge requests in flight.",
                                          lower_bound=1)
_IMAGE_ROOT = flags.DEFINE_string("image_root", None, "Folder the image paths are relative to "
                                  "(default: the question file's folder).")
_OUT = flags.DEFINE_string("out", None, "Output folder.", required=True)
steering.define_flags()  # --sae --layer --latents --mode --values --strengths --positions
_SUFFIX = flags.DEFINE_string("question_suffix", "", "pope, hallusionbench: appended to every "
                              "question, e.g. ' Please answer yes or no.' (neither benchmark "
                              "adds anything).")
_CAPTION_PROMPT = flags.DEFINE_string("caption_prompt", "Please describe this image in detail.",
                                      "chair: prompt of the items without their own.")
_VOCABULARY = flags.DEFINE_string("vocabulary", None, "chair: synonyms file (the reference's "
                                  "data/synonyms.txt): one object per line, names separated by "
                                  "', ', canonical name first (default: the items' object names).")
_MAX_QUESTIONS = flags.DEFINE_integer("max_questions", 0, "Only the first N items (0: all).",
                                      lower_bound=0)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Items per generate call.", lower_bound=1)
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 0, "Answer length (0: 16 for pope, "
                                       "which reads the first sentence; 512 for chair; 128 for "
                                       "hallusionbench, as lmms-eval).",
                                       lower_bound=0)

FLAGS = flags.FLAGS
flags.adopt_module_key_flags(llava)  # --help lists the shared flags too
flags.adopt_module_key_flags(steering)
USER_ERRORS = (pope.QuestionError, steering.SteeringError, HookError, llava.ModelError,
               images.BadImage, hallusionbench.JudgeError, prompts.TemplateError)


@dataclasses.dataclass(frozen=True)
class Task:
  """What differs between benchmarks: items, prompts, scoring and the table's columns."""
  read: Callable[[str, str | None], list]  # (path, image root) -> items with an `image` path
  # (None: asked without an image)
  prompt: Callable[[object], str]
  score: Callable[[list, list[str]], tuple[dict, list[dict]]]  # -> metrics, one record per answer
  columns: tuple[str, ...]  # shown as percentages, except "length"
  max_new_tokens: int
  scale: float = 100.0  # metrics x scale = percent
  # Writes a run's answers where the benchmark wants them: (out folder, run label, items, answers)
  save: Callable[[Path, str, list, list[str]], None] | None = None


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


def judge_device() -> str:
  """Where an hf: judge runs: --device, with auto meaning cuda when there is one."""
  if _LLAVA.device.value != "auto":
    return _LLAVA.device.value
  return "cuda" if torch.cuda.is_available() else "cpu"


def judge_codes() -> Callable[[list, list[str]], list[tuple[str, str]]]:
  """(correctness code, judgment) per answer by --judge; an LLM judge is contacted now, so that
  a bad one fails before any work."""
  if _JUDGE.spec.value == "rule":
    return hallusionbench.rule_codes
  try:
    client = _JUDGE.client(timeout_s=120.0, max_tokens=32, device=judge_device())
  except explainers.ExplainerError as e:
    raise hallusionbench.JudgeError(f"--judge={_JUDGE.spec.value}: {e}") from e
  template = prompts.load_template(_JUDGE_TEMPLATE.value or
                                   hallusionbench.DEFAULT_JUDGE_TEMPLATE)
  settings = jobs.JobSettings(concurrency=_JUDGE_CONCURRENCY.value)
  return lambda questions, answers: hallusionbench.llm_codes(
      questions, answers, client, template, Path(_OUT.value) / "judge_cache", settings)


def hallusionbench_scorer(judge):
  def score(questions: list[hallusionbench.Question],
            answers: list[str]) -> tuple[dict, list[dict]]:
    judged = judge(questions, answers)
    records = [{"row": i + 1, **{k: q.row.get(k) for k in (*hallusionbench.KEY_FIELDS,
                                                           "visual_input", "gt_answer")},
                "question": q.question, "answer": a, "judgment": judgment,
                "correct": hallusionbench.is_correct(q, code)}
               for i, (q, a, (code, judgment)) in enumerate(zip(questions, answers, judged))]
    return hallusionbench.scores(questions, [code for code, _ in judged]), records
  return score


def result_file(out: Path, label: str) -> Path:
  """Where a run's official result file goes: HallusionBench_result.json for the plain run."""
  suffix = "" if label == "plain" else "_" + re.sub(r"[^\w.=,+-]+", "_", label)
  return out / f"HallusionBench_result{suffix}.json"


def make_task(name: str) -> Task:
  """The task of --task; a --vocabulary or an LLM --judge is set up now, so that a bad one fails
  before any work."""
  if name == "pope":
    return Task(pope.read_questions, lambda q: q.question + _SUFFIX.value, score_pope,
                ("accuracy", "precision", "recall", "f1", "yes_ratio"), 16)
  if name == "hallusionbench":
    save = lambda out, label, items, answers: hallusionbench.write_results(
        result_file(out, label), items, answers)
    return Task(hallusionbench.read_questions, lambda q: q.question + _SUFFIX.value,
                hallusionbench_scorer(judge_codes()), ("aAcc", "fAcc", "qAcc", "easy", "hard"),
                128, scale=1.0, save=save)
  vocabulary = chair.read_vocabulary(_VOCABULARY.value) if _VOCABULARY.value else None
  return Task(chair.read_items, lambda item: item.prompt or _CAPTION_PROMPT.value,
              chair_scorer(vocabulary), ("chair_s", "chair_i", "recall", "length"), 512)


def load_image(item, row: int) -> Image.Image:
  try:
    return images.decode_image(lambda: Image.open(item.image))
  except images.BadImage as e:
    raise images.BadImage(f"--questions={_QUESTIONS.value} row {row + 1}: image "
                          f"{item.image}: {e}") from e


def check_images(items: list) -> None:
  """Every item's image exists: run before loading a large model."""
  for row, item in enumerate(items):
    if item.image is not None and not item.image.is_file():
      raise images.BadImage(f"--questions={_QUESTIONS.value} row {row + 1}: image "
                            f"{item.image} does not exist (check --image_root)")


def answer_all(loaded: llava.LoadedModel, task: Task, items: list, desc: str,
               generate: Callable = steering.generate_texts) -> list:
  """One result of `generate(loaded, images, texts, max_new_tokens)` per item (default: its
  answer), in batches of --batch_size."""
  answers = []
  size = _BATCH_SIZE.value
  max_new_tokens = _MAX_NEW_TOKENS.value or task.max_new_tokens
  for start in tqdm.tqdm(range(0, len(items), size), desc=desc, unit="batch"):
    batch = items[start:start + size]
    batch_answers = [""] * len(batch)
    for with_image in (True, False):  # items without an image (image None) are asked without one
      rows = [i for i, item in enumerate(batch) if (item.image is not None) == with_image]
      if not rows:
        continue
      texts = [llava.prompt_text(loaded.processor, _LLAVA.prompt_mode.value,
                                 task.prompt(batch[i]), with_image) for i in rows]
      batch_images = [load_image(batch[i], start + i) for i in rows] if with_image else None
      for i, answer in zip(rows, generate(loaded, batch_images, texts, max_new_tokens)):
        batch_answers[i] = answer
    answers += batch_answers
  return answers


def markdown(runs: list[dict], columns: tuple[str, ...], scale: float = 100.0) -> str:
  lines = ["| run | " + " | ".join(columns) + " |", "| --- |" + " ---: |" * len(columns)]
  for run in runs:
    cells = " | ".join(f"{run[c]:.1f}" if c == "length" else f"{scale * run[c]:.2f}"
                       for c in columns)
    lines.append(f"| {run['label']} | {cells} |")
  return "\n".join(lines) + "\n"


def rescore(task: Task) -> tuple[dict, list[dict], Task]:
  """--predictions: the result file's answers judged and scored, no model."""
  if _QUESTIONS.value or _LLAVA.model.value or FLAGS.sae:
    raise pope.QuestionError("--predictions re-scores a result file: it takes no --questions, "
                             "--model or --sae")
  items = hallusionbench.read_questions(_PREDICTIONS.value, predictions=True)
  metrics, records = task.score(items, [q.row["model_prediction"] for q in items])
  return {"task": _TASK.value, "predictions": _PREDICTIONS.value, "judge": _JUDGE.spec.value,
          "items": len(items), "runs": [{"label": "predictions", **metrics}]}, records, task


def run() -> tuple[dict, list[dict], Task]:
  if _TASK.value != "hallusionbench" and (_PREDICTIONS.value or _JUDGE.spec.value != "rule"):
    raise pope.QuestionError("--predictions and --judge are for --task=hallusionbench")
  task = make_task(_TASK.value)
  if _PREDICTIONS.value:
    return rescore(task)
  if not _QUESTIONS.value or not _LLAVA.model.value:
    raise pope.QuestionError("give --questions and --model (or, for --task=hallusionbench, "
                             "--predictions to re-score a result file)")
  configs = steering.configs_from_flags(FLAGS) if FLAGS.sae else []
  if not FLAGS.sae and (FLAGS.latents or FLAGS.values or FLAGS.strengths):
    raise steering.SteeringError("--latents/--values/--strengths need --sae")
  items = task.read(_QUESTIONS.value, _IMAGE_ROOT.value)
  if _MAX_QUESTIONS.value:
    items = items[:_MAX_QUESTIONS.value]
  check_images(items)
  loaded = _LLAVA.load()
  runs = [("plain", contextlib.nullcontext())]
  if configs:
    sae, layer = steering.load_sae(loaded, FLAGS.sae, FLAGS.layer)
    runs += [(f"{FLAGS.mode} {label}", steering.steering_for(
        loaded, sae, layer, edits, FLAGS.mode, FLAGS.positions)) for label, edits in configs]
  generated = []
  for label, steer in runs:
    with steer:
      answers = answer_all(loaded, task, items, label)
    if task.save:
      task.save(Path(_OUT.value), label, items, answers)
    generated.append((label, answers))
  results, answer_rows = [], []
  for label, answers in generated:  # after every run is saved: a judge that fails loses nothing
    metrics, records = task.score(items, answers)
    results.append({"label": label, **metrics})
    answer_rows += [{"run": label, **record} for record in records]
  judge = {"judge": _JUDGE.spec.value} if _TASK.value == "hallusionbench" else {}
  return {"task": _TASK.value, "model": _LLAVA.model.value, "questions": _QUESTIONS.value,
          "items": len(items), "sae": FLAGS.sae, "mode": FLAGS.mode if configs else None,
          "positions": FLAGS.positions if configs else None, **judge, "runs": results}, \
      answer_rows, task


def main():
  Path(_OUT.value).mkdir(parents=True, exist_ok=True)
  result, answer_rows, task = run()
  out = Path(_OUT.value)
  with open(out / "answers.jsonl", "w") as f:
    f.writelines(json.dumps(row) + "\n" for row in answer_rows)
  table = markdown(result["runs"], task.columns, task.scale)
  (out / "results.md").write_text(table)
  atomic_write_json(out / "results.json", result)
  print(table, end="")
  runs = {r["label"]: {c: round(r[c], 4) for c in task.columns} for r in result["runs"]}
  if _PREDICTIONS.value:  # one file, one line of metrics
    print(json.dumps({"ok": True, "task": _TASK.value, "out": str(out), "items": result["items"],
                      **runs["predictions"]}))
  else:
    print(json.dumps({"ok": True, "task": _TASK.value, "out": str(out), "items": result["items"],
                      "runs": runs}))


if __name__ == "__main__":
  cli.run(main, USER_ERRORS)
