"""CHAIR (Rohrbach et al., EMNLP 2018): object hallucination in free-form captions.

A caption file is JSONL, one `{"image", "objects": [ground-truth object names], "prompt": optional}`
per line (`python -m eval.coco_objects` writes one from COCO's annotations). The object vocabulary
is the reference's `data/synonyms.txt` (LisaAnne/Hallucination), read as the reference reads it:
one object per line, names separated by ", ", the canonical name first, e.g.
`person, girl, boy, man, woman, people`. Without one, every ground-truth object name of the caption
file is its own canonical name.

Matching follows the reference's `utils/chair.py` `caption_to_words`, step by step:
  1. lowercase and tokenize (nltk's word_tokenize there: punctuation and clitics split off and
     stay tokens, a hyphen, slash or inner period joins, so "hot-dog" is one token and no object);
  2. singularize every token with pattern.en's rules (eval/metrics/singular.py; "bus" -> "bu" included);
  3. merge two-token phrases, left to right: the reference's COCO double words ("hot dog",
     "teddy bear", "home plate", ...; "train track" and "home plate" count as no object),
     "baby/adult <animal>" -> the animal and "passenger jet/train" -> jet/train (not person),
     "bow tie" -> tie, "toilet seat" -> toilet, "wine glas" -> wine glass; plus every two-word
     name of the vocabulary (the reference's file has one more, "dining table", with the same
     result as its "table");
  4. drop "seat" when "toilet" is in the caption (a toilet seat is no chair);
  5. keep the names of the vocabulary and map each to its canonical object.
A three-word name ("stove top oven") is read but, as in the reference, never matched: only two
tokens are merged. Names are compared as written, so the reference's " motor bike",
" cheesecake" (a doubled space) and "iPhone" (capital) never match there or here.

A mention is hallucinated when its canonical object is not one of the image's ground-truth objects.
  chair_i = hallucinated mentions / object mentions (every mention counts, as in the original)
  chair_s = captions with a hallucinated mention / captions
  recall  = ground-truth objects mentioned / ground-truth objects (per caption, then summed; ours)
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from eval.tasks.pope import QuestionError, jsonl_rows
from eval.metrics.singular import singularize

ANIMALS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe",
           "animal", "cub")
# Two-token phrases of the reference, and what each counts as.
REFERENCE_MERGES = {
    **{p: p for p in ("motor bike", "motor cycle", "air plane", "traffic light", "street light",
                      "traffic signal", "stop light", "fire hydrant", "stop sign", "parking meter",
                      "suit case", "sports ball", "baseball bat", "baseball glove",
                      "tennis racket", "wine glass", "hot dog", "cell phone", "mobile phone",
                      "teddy bear", "hair drier", "potted plant", "bow tie", "laptop computer",
                      "home plate", "train track")},
    **{f"{age} {animal}": animal for animal in ANIMALS for age in ("baby", "adult")},
    "passenger jet": "jet", "passenger train": "train",
    "bow tie": "tie", "toilet seat": "toilet", "wine glas": "wine glass"}
# Punctuation that nltk's Treebank tokenizer makes a token of its own. Punctuation tokens stay in
# the token list: "laptop, computer" must not merge into "laptop computer".
_PUNCTUATION = re.compile(r"""(--|[,;:!?()\[\]{}<>"`@#$%&])""")
# Endings it splits off a word: "man's" -> "man" "'s", "dogs'" -> "dogs" "'", "don't" -> "do"
# "n't"; a leading quote stays on the word ("'bird" is no bird there either).
_CLITIC = re.compile(r"(.*[^'])('s|'m|'d|'ll|'re|'ve|n't|')")


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
    if not isinstance(objects, list) or "image" not in row:
      raise QuestionError(f"{path}:{line_no}: expected an object with \"image\" and an "
                          "\"objects\" list")
    items.append(CaptionItem(root / row["image"], tuple(str(o).lower() for o in objects),
                             row.get("prompt")))
  if not items:
    raise QuestionError(f"--questions={path} holds no items")
  return items


@dataclasses.dataclass(frozen=True)
class Vocabulary:
  canonical: dict[str, str]  # every name -> its canonical object
  merges: dict[str, str]  # "token token" -> the word the pair counts as


def make_vocabulary(canonical: dict[str, str]) -> Vocabulary:
  two_word = {name: name for name in canonical if len(name.split(" ")) == 2}
  return Vocabulary(canonical, {**two_word, **REFERENCE_MERGES})


def read_vocabulary(path: str | Path) -> Vocabulary:
  """The synonyms file at `path`, split as the reference splits it (a later line wins a name)."""
  if not Path(path).is_file():
    raise QuestionError(f"--vocabulary={path} does not exist")
  canonical = {}
  for line in Path(path).read_text().splitlines():
    if line.strip():
      names = line.strip().split(", ")
      canonical.update((name, names[0]) for name in names)
  if not canonical:
    raise QuestionError(f"--vocabulary={path} holds no names")
  return make_vocabulary(canonical)


def vocabulary_of(items: list[CaptionItem]) -> Vocabulary:
  """The default vocabulary: every ground-truth object name, as its own canonical name."""
  return make_vocabulary({name: name for item in items for name in item.objects})


def tokens(caption: str) -> list[str]:
  """Lowercase tokens of a caption, as nltk's word_tokenize cuts ordinary text: punctuation and
  clitics split off, a period ending a word too (it ends a sentence), inner periods, hyphens and
  slashes stay ("hot-dog", "cat/dog")."""
  out = []
  for piece in _PUNCTUATION.split(caption.lower()):
    if _PUNCTUATION.fullmatch(piece):
      out.append(piece)
      continue
    for word in piece.split():
      stem = word.rstrip(".")
      clitic = _CLITIC.fullmatch(stem)
      out += [clitic[1], clitic[2]] if clitic else [stem] if stem else []
      if stem != word:
        out.append(".")
  return out


def words(caption: str, vocabulary: Vocabulary) -> list[str]:
  """The caption's singular tokens after merging two-token phrases and the toilet-seat rule."""
  singular = [singularize(t) for t in tokens(caption)]
  merged, i = [], 0
  while i < len(singular):
    pair = " ".join(singular[i:i + 2])
    if i + 1 < len(singular) and pair in vocabulary.merges:
      merged.append(vocabulary.merges[pair])
      i += 2
    else:
      merged.append(singular[i])
      i += 1
  if "toilet" in merged:
    merged = [w for w in merged if w != "seat"]
  return merged


def mentions(caption: str, vocabulary: Vocabulary) -> list[str]:
  """Canonical objects mentioned in a caption, one entry per mention, in order."""
  return [vocabulary.canonical[w] for w in words(caption, vocabulary) if w in vocabulary.canonical]


def canonical_objects(names: tuple[str, ...], vocabulary: Vocabulary) -> set[str]:
  """Ground-truth names as objects: a vocabulary name maps to its object (COCO category names are
  synonyms' first names), other text goes through the caption matching, the rest stays as is."""
  objects = set()
  for name in names:
    if name in vocabulary.canonical:
      objects.add(vocabulary.canonical[name])
    else:
      objects.update(mentions(name, vocabulary) or [name])
  return objects


def scores(captions: list[str], truths: list[tuple[str, ...]], vocabulary: Vocabulary) -> dict:
  """CHAIR_i, CHAIR_s, recall and the mean caption length in words."""
  mentioned_total = hallucinated_total = captions_hallucinating = 0
  covered = truth_total = 0
  for caption, truth in zip(captions, truths, strict=True):
    canonical_truth = canonical_objects(truth, vocabulary)
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
