"""POPE (Li et al., EMNLP 2023): yes/no object-existence questions, answer parsing and metrics.

A question file is JSONL, one `{"image", "question" | "text", "label": "yes" | "no"}` per line. The
official files (AoiDragon/POPE `output/coco/coco_pope_{random,popular,adversarial}.json`) have
`{"question_id", "image", "text", "label"}` and load as they are; image paths are relative to an
image root (COCO val2014 for them).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

LABELS = ("yes", "no")
# The words that make an answer "no", exactly as the official script has them (case-sensitive:
# "No", "no" and "not"; "NO" or "Not" count as yes there, so they do here).
NO_WORDS = frozenset({"No", "not", "no"})


class QuestionError(ValueError):
  """A question file or row that cannot be used (names the file and line)."""


@dataclasses.dataclass(frozen=True)
class Question:
  image: Path
  question: str
  label: str
  question_id: object = None


def jsonl_rows(path: Path):
  """(line number, parsed JSON) of each non-blank line; a missing file or an unparsable line is a
  QuestionError."""
  if not path.is_file():
    raise QuestionError(f"--questions={path} does not exist")
  with open(path) as f:
    for line_no, line in enumerate(f, 1):
      if line.strip():
        try:
          yield line_no, json.loads(line)
        except json.JSONDecodeError as e:
          raise QuestionError(f"{path}:{line_no}: not JSON ({e})") from e


def read_questions(path: str | Path, image_root: str | Path | None = None) -> list[Question]:
  """Questions of a JSONL file; relative image paths are relative to `image_root` (default: the
  file's folder)."""
  path = Path(path)
  root = Path(image_root) if image_root else path.parent
  questions = []
  for line_no, row in jsonl_rows(path):
    text = row.get("question", row.get("text")) if isinstance(row, dict) else None
    if not isinstance(text, str) or "image" not in row:
      raise QuestionError(f"{path}:{line_no}: expected an object with \"image\" and \"question\" "
                          "(or POPE's \"text\")")
    label = str(row.get("label", "")).strip().lower()
    if label not in LABELS:
      raise QuestionError(f"{path}:{line_no}: label {row.get('label')!r} is not yes or no")
    questions.append(Question(root / row["image"], text, label, row.get("question_id")))
  if not questions:
    raise QuestionError(f"--questions={path} holds no questions")
  return questions


def parse_answer(text: str) -> str:
  """POPE's rule (AoiDragon/POPE evaluate.py, also LLaVA's eval_pope.py): keep the text before the
  first '.', drop commas, split into words; "no" if any word is No / no / not, else "yes".

  The official script splits on single spaces, so a newline glued to a word ("No\\n") hides it and
  the answer counts as yes; here the text is stripped and split on any whitespace."""
  first_sentence = text.strip().split(".")[0]
  words = first_sentence.replace(",", "").split()
  return "no" if NO_WORDS.intersection(words) else "yes"


def metrics(predictions: list[str], labels: list[str]) -> dict:
  """Accuracy, precision, recall, F1 with "yes" as the positive class, and the yes ratio.

  The official script divides by zero when nothing is answered "yes"; here such a ratio is 0.
  """
  if len(predictions) != len(labels) or not labels:
    raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
  pairs = list(zip(predictions, labels))
  tp = sum(p == "yes" and t == "yes" for p, t in pairs)
  fp = sum(p == "yes" and t == "no" for p, t in pairs)
  tn = sum(p == "no" and t == "no" for p, t in pairs)
  fn = sum(p == "no" and t == "yes" for p, t in pairs)
  precision = tp / (tp + fp) if tp + fp else 0.0
  recall = tp / (tp + fn) if tp + fn else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return {"accuracy": (tp + tn) / len(pairs), "precision": precision, "recall": recall, "f1": f1,
          "yes_ratio": (tp + fp) / len(pairs), "tp": tp, "fp": fp, "tn": tn, "fn": fn,
          "questions": len(pairs)}
