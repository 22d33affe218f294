"""HallusionBench (Guan et al., CVPR 2024; tianyi-lab/HallusionBench): questions, judging, metrics.

The question file is the official `HallusionBench.json` as it is: a JSON list of 1,129 rows with
`category` (VD visual-dependent, VS visual-supplement), `subcategory`, `set_id`, `figure_id`,
`question_id`, `visual_input` ("0" no image, "1" original, "2" edited), `question`,
`gt_answer_details`, `gt_answer` ("1" yes, "0" no) and `filename` (relative to the image root, or
null for the 178 questions asked without an image). A result file is the same list with each
row's answer in `model_prediction`, which the official `evaluation.py` reads.

Judging gives each answer the official correctness code: "1" correct, "0" incorrect, "2" unclear.
  rule: yes / no / uncertain from the answer's words: its first word when that is yes or no, else
        the one of the two that occurs alone; both or neither is uncertain. yes/no is compared
        with `gt_answer`; uncertain is "2".
  LLM:  a text model (the explainer backends) reads the question, `gt_answer_details` and the
        answer, as the official GPT-4 judge does, and its reply is read with the official rule:
        "incorrect" anywhere -> "0", else "correct" -> "1", else "2".
Correct, as the official `assign_correctness`: code "1"; on VS questions without a figure
(figure_id "0") code "2" too (not knowing is right when there is nothing to look at).

Metrics in percent, as the official `utils.py` computes them:
  aAcc  correct questions / questions (get_eval_all)
  fAcc  figures whose questions are all correct / figures; a figure is (category, subcategory,
        set_id, figure_id), VS questions without a figure excluded (get_eval_fig)
  qAcc  question pairs answered correctly in every visual setting / pairs; a pair is (category,
        subcategory, set_id, question_id) (get_eval_pair_all)
  easy, hard  qAcc over the questions with visual_input "0"/"1" (easy) or "2" (hard)
        (get_eval_pair_easy / _hard; the official leaderboard labels them easy/hard aAcc)
A metric over no group is 0 (the official script divides by zero). The failure analysis (language
hallucination / visual illusion), which needs a second GPT "same answer?" check, is not computed.
"""

from __future__ import annotations

import concurrent.futures as futures
import dataclasses
import json
import re
from pathlib import Path

from eval.tasks.pope import QuestionError
from interpret import jobs, prompts
from interpret.explainers import ExplainerError

KEY_FIELDS = ("category", "subcategory", "set_id", "figure_id", "question_id")
SCORED = (*KEY_FIELDS, "visual_input", "question")  # what scoring reads (the judges add theirs)
DEFAULT_JUDGE_TEMPLATE = Path(__file__).parents[1] / "templates" / "hallusionbench_judge.txt"
CORRECT, INCORRECT, UNCLEAR = "1", "0", "2"


class JudgeError(ValueError):
  """An LLM judgment that could not be had (after retries), or a judge that cannot run."""


@dataclasses.dataclass(frozen=True)
class Question:
  row: dict  # the file's row, written back with model_prediction
  image: Path | None  # None: asked without an image
  question: str
  where: str  # "--questions=FILE row N", for errors

  def field(self, name: str) -> str:
    return str(self.row[name])


def read_questions(path: str | Path, image_root: str | Path | None = None, *,
                   predictions: bool = False) -> list[Question]:
  """The rows of an official question file (or, with `predictions`, of a result file, which must
  have `model_prediction` and may lack `filename`, as the official sample does); relative file
  names are relative to `image_root` (default: the file's folder)."""
  path = Path(path)
  flag = "--predictions" if predictions else "--questions"
  try:
    rows = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise QuestionError(f"{flag}={path}: cannot read it as JSON ({e})") from e
  if not isinstance(rows, list) or not rows:
    raise QuestionError(f"{flag}={path}: expected the official JSON list of questions")
  root = Path(image_root) if image_root else path.parent
  required = (*SCORED, "model_prediction") if predictions else (*SCORED, "filename")
  questions, seen = [], {}
  for number, row in enumerate(rows, 1):
    where = f"{flag}={path} row {number}"
    missing = [k for k in required if not isinstance(row, dict) or k not in row]
    if missing:
      raise QuestionError(f"{where}: no {', '.join(missing)}")
    if row["category"] not in ("VD", "VS") or str(row["visual_input"]) not in ("0", "1", "2"):
      raise QuestionError(f"{where}: category {row['category']!r} / visual_input "
                          f"{row['visual_input']!r} is not VD|VS / 0|1|2")
    if "gt_answer" in row and str(row["gt_answer"]) not in ("0", "1"):
      raise QuestionError(f"{where}: gt_answer {row['gt_answer']!r} is not \"0\" or \"1\"")
    filename = row.get("filename")
    if not (filename is None or isinstance(filename, str)):
      raise QuestionError(f"{where}: filename {filename!r} is neither a path nor null")
    if predictions and not isinstance(row["model_prediction"], str):
      raise QuestionError(f"{where}: model_prediction is not a string")
    key = tuple(str(row[k]) for k in KEY_FIELDS)
    if key in seen:  # the official scorer asserts these are unique
      raise QuestionError(f"{where}: same {'/'.join(KEY_FIELDS)} as row {seen[key]}")
    seen[key] = number
    image = root / filename if filename is not None else None
    questions.append(Question(row, image, str(row["question"]), where))
  return questions


def rule_judgment(answer: str) -> str:
  """yes, no or uncertain (see the module doc)."""
  words = re.findall(r"[a-z]+", answer.lower())
  if words and words[0] in ("yes", "no"):
    return words[0]
  if ("yes" in words) != ("no" in words):
    return "yes" if "yes" in words else "no"
  return "uncertain"


def rule_code(question: Question, answer: str) -> str:
  judgment = rule_judgment(answer)
  if judgment == "uncertain":
    return UNCLEAR
  return CORRECT if (judgment == "yes") == (question.field("gt_answer") == "1") else INCORRECT


def rule_codes(questions: list[Question], answers: list[str]) -> list[tuple[str, str]]:
  """(code, judgment) per answer from the rule judge, which needs every row's gt_answer."""
  for question in questions:
    if "gt_answer" not in question.row:
      raise QuestionError(f"{question.where}: no gt_answer, which the rule judge needs (an LLM "
                          "--judge reads gt_answer_details instead)")
  return [(rule_code(q, a), rule_judgment(a)) for q, a in zip(questions, answers, strict=True)]


def reply_code(reply: str) -> str:
  """The official reading of the judge's reply."""
  reply = reply.lower()
  return INCORRECT if "incorrect" in reply else CORRECT if "correct" in reply else UNCLEAR


def judge_prompt(template: prompts.Template, question: Question, answer: str) -> prompts.Prompt:
  fill = lambda text: (text.replace("{question}", question.question)
                       .replace("{reference}", str(question.row.get("gt_answer_details", "")))
                       .replace("{prediction}", answer))
  return prompts.Prompt(fill(template.system), fill(template.user), ())


def llm_codes(questions: list[Question], answers: list[str], client, template: prompts.Template,
              cache_dir: Path, settings: jobs.JobSettings) -> list[tuple[str, str]]:
  """(code, reply) per answer from an explainer-backend client; replies are cached in
  `cache_dir`, so a rerun asks only what it has not had."""
  cache, counters = jobs.ResponseCache(cache_dir), jobs.Counters()

  def one(index: int) -> tuple[str, str]:
    question = questions[index]
    if "gt_answer_details" not in question.row:
      raise QuestionError(f"{question.where}: no gt_answer_details, which the LLM judge reads")
    prompt = judge_prompt(template, question, answers[index])
    key = jobs.ResponseCache.key(client.identity, prompt)
    reply = cache.get(key)
    if reply is None:
      try:
        reply, _ = jobs.with_retries(lambda: client.complete(prompt), settings, counters)
      except ExplainerError as e:
        raise JudgeError(f"judge {client.name}: {question.where}: {e} (rerun: the answers "
                         "judged so far are cached)") from e
      cache.put(key, reply)
    return reply_code(reply), reply

  with futures.ThreadPoolExecutor(settings.concurrency) as pool:
    return list(pool.map(one, range(len(questions))))


def is_correct(question: Question, code: str) -> bool:
  """The official assign_correctness."""
  no_figure = question.row["category"] == "VS" and question.field("figure_id") == "0"
  return code == CORRECT or (no_figure and code == UNCLEAR)


def _all_correct_share(groups: dict[tuple, list[bool]]) -> float:
  return 100 * sum(all(v) for v in groups.values()) / len(groups) if groups else 0.0


def _groups(pairs, fields: tuple[str, ...]) -> dict[tuple, list[bool]]:
  groups: dict[tuple, list[bool]] = {}
  for question, correct in pairs:
    groups.setdefault(tuple(question.field(f) for f in fields), []).append(correct)
  return groups


def metrics(questions: list[Question], correct: list[bool]) -> dict:
  """aAcc, fAcc, qAcc, easy and hard in percent, with the counts they divide by."""
  pairs = list(zip(questions, correct, strict=True))
  pair_key = ("category", "subcategory", "set_id", "question_id")
  figures = _groups([(q, c) for q, c in pairs
                     if not (q.row["category"] == "VS" and q.field("figure_id") == "0")],
                    ("category", "subcategory", "set_id", "figure_id"))
  question_pairs = _groups(pairs, pair_key)
  easy = _groups([(q, c) for q, c in pairs if q.field("visual_input") != "2"], pair_key)
  hard = _groups([(q, c) for q, c in pairs if q.field("visual_input") == "2"], pair_key)
  return {"aAcc": 100 * sum(correct) / len(pairs) if pairs else 0.0,
          "fAcc": _all_correct_share(figures), "qAcc": _all_correct_share(question_pairs),
          "easy": _all_correct_share(easy), "hard": _all_correct_share(hard),
          "questions": len(pairs), "figures": len(figures), "pairs": len(question_pairs)}


def scores(questions: list[Question], codes: list[str]) -> dict:
  """The metrics overall and per category (VD, VS), as the official tables give them."""
  correct = [is_correct(q, code) for q, code in zip(questions, codes, strict=True)]
  by_category = {}
  for category in ("VD", "VS"):
    chosen = [(q, c) for q, c in zip(questions, correct) if q.row["category"] == category]
    if chosen:
      by_category[category] = metrics([q for q, _ in chosen], [c for _, c in chosen])
  return {**metrics(questions, correct), "by_category": by_category}


def write_results(path: Path, questions: list[Question], answers: list[str]) -> None:
  """The official result file: the question rows with `model_prediction` added."""
  rows = [{**q.row, "model_prediction": a} for q, a in zip(questions, answers, strict=True)]
  path.write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n")
