"""CHAIR (Rohrbach et al., EMNLP 2018): object hallucination in free-form captions.

A caption file is JSONL, one `{"image", "objects": [ground-truth object names], "prompt": optional}`
per line. The object vocabulary is a text file with one object per line, comma-separated synonyms,
the canonical name first: the format of `data/synonyms.txt` in LisaAnne/Hallucination (its 80 COCO
classes), e.g. `person, girl, boy, man, woman, people`. Without one, every ground-truth object name
of the caption file is its own canonical name.

Matching, as in LisaAnne/Hallucination `utils/chair.py`, with documented simplifications: lowercase,
split into words, two-word phrases ("hot dog", "traffic light") before single words, plural words
mapped to the singular by a few suffix rules plus a small irregular table (the original uses
pattern.en's singularize); the original's special case "toilet seat" is not reproduced. A mention is
hallucinated when its canonical object is not one of the image's ground-truth objects.
  chair_i = hallucinated mentions / object mentions (every mention counts, as in the original)
  chair_s = captions with a hallucinated mention / captions
  recall  = ground-truth objects mentioned / ground-truth objects (per caption, then summed)
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from eval.pope import QuestionError, jsonl_rows

IRREGULAR = {"men": "man", "women": "woman", "people": "person", "children": "child",
             "mice": "mouse", "geese": "goose", "teeth": "tooth", "feet": "foot",
             "knives": "knife", "wolves": "wolf", "leaves": "leaf"}


@dataclasses.dataclass(frozen=True)
class CaptionItem:
  image: Path
  objects: tuple[str, ...]
  prompt: str | None = None


def read_items(path: str | Path, image_root: str | Path | None = None) -> list[CaptionItem]:
  """Items of a caption JSONL file; relative image paths are relative to `image_root` (default:
  the file's folder)."""
  path = Path(path)
  root = Path(image_root) if image_root else path.parent
  items = []
  for line_no, row in jsonl_rows(path):
    objects = row.get("objects") if isinstance(row, dict) else None
    if "image" not in row or not isinstance(objects, list):
      raise QuestionError(f"{path}:{line_no}: expected an object with \"image\" and an "
                          "\"objects\" list")
    items.append(CaptionItem(root / row["image"], tuple(str(o).lower() for o in objects),
                             row.get("prompt")))
  if not items:
    raise QuestionError(f"--questions={path} holds no items")
  return items


def read_vocabulary(path: str | Path) -> dict[str, str]:
  """{word or two-word phrase: canonical object} from a synonyms file."""
  if not Path(path).is_file():
    raise QuestionError(f"--vocabulary={path} does not exist")
  vocabulary = {}
  for line_no, line in enumerate(Path(path).read_text().splitlines(), 1):
    names = [n.strip().lower() for n in line.split(",") if n.strip()]
    if not names:
      continue
    for name in names:
      if len(name.split()) > 2:
        raise QuestionError(f"--vocabulary={path}:{line_no}: {name!r} has more than two words")
      vocabulary[name] = names[0]
  return vocabulary


def vocabulary_of(items: list[CaptionItem]) -> dict[str, str]:
  """The default vocabulary: every ground-truth object name, as its own canonical name."""
  return {name: name for item in items for name in item.objects}


def singular_forms(word: str) -> list[str]:
  """Candidate singulars of a word, most specific first (the word itself comes first)."""
  forms = [word]
  if word in IRREGULAR:
    forms.append(IRREGULAR[word])
  if word.endswith("ies") and len(word) > 4:
    forms.append(word[:-3] + "y")
  if word.endswith("es") and word[:-2].endswith(("s", "x", "z", "ch", "sh")):
    forms.append(word[:-2])
  if word.endswith("s") and not word.endswith("ss"):
    forms.append(word[:-1])
  return forms


def mentions(caption: str, vocabulary: dict[str, str]) -> list[str]:
  """Canonical objects mentioned in a caption, one entry per mention, in order."""
  words = re.findall(r"[a-z]+", caption.lower())
  found, i = [], 0

  def lookup(prefix: str, word: str) -> str | None:
    for form in singular_forms(word):
      if prefix + form in vocabulary:
        return vocabulary[prefix + form]
    return None

  while i < len(words):
    phrase = lookup(words[i] + " ", words[i + 1]) if i + 1 < len(words) else None
    if phrase is not None:
      found.append(phrase)
      i += 2
      continue
    single = lookup("", words[i])
    if single is not None:
      found.append(single)
    i += 1
  return found


def scores(captions: list[str], truths: list[tuple[str, ...]], vocabulary: dict[str, str]) -> dict:
  """CHAIR_i, CHAIR_s, recall and the mean caption length in words."""
  mentioned_total = hallucinated_total = captions_hallucinating = 0
  covered = truth_total = 0
  for caption, truth in zip(captions, truths, strict=True):
    # Ground-truth names go through the same matching ("men" -> person); unknown names stay as are.
    canonical_truth = {name for t in truth for name in (mentions(t, vocabulary) or [t])}
    found = mentions(caption, vocabulary)
    hallucinated = [o for o in found if o not in canonical_truth]
    mentioned_total += len(found)
    hallucinated_total += len(hallucinated)
    captions_hallucinating += bool(hallucinated)
    covered += len(canonical_truth & set(found))
    truth_total += len(canonical_truth)
  return {"chair_i": hallucinated_total / mentioned_total if mentioned_total else 0.0,
          "chair_s": captions_hallucinating / len(captions) if captions else 0.0,
          "recall": covered / truth_total if truth_total else 0.0,
          "length": sum(len(c.split()) for c in captions) / len(captions) if captions else 0.0,
          "mentions": mentioned_total, "captions": len(captions)}
