"""Our CHAIR matching against the reference's own code, caption by caption.

Not part of the project: it runs the reference from clones (nothing of theirs is stored here):

  git clone https://github.com/LisaAnne/Hallucination /tmp/Hallucination
  git clone https://github.com/clips/pattern /tmp/pattern
  python -m venv /tmp/chairvenv && /tmp/chairvenv/bin/pip install nltk
  PYTHONPATH=. /tmp/chairvenv/bin/python benchmarks/chair_compare.py \
      --hallucination=/tmp/Hallucination --pattern=/tmp/pattern [--captions=answers.jsonl]

The reference `utils/chair.py` is Python 2: its source is loaded with the print statements
dropped, with pattern.en's `singularize` taken from the pattern clone's `inflect.py` (only the
singular section is executed: the rest of pattern does not import on Python 3), and with nltk's
Treebank tokenizer on sentences split after ". ", '." ' and the like when nltk's punkt data is
absent (word_tokenize needs it; that split is what punkt does on ordinary captions). Its
`caption_to_words` is compared with eval.tasks.chair.mentions on built-in captions and, with --captions,
on the `answer` (or `caption`) of each line of a JSONL file (eval.hallucination's answers.jsonl).
Singulars are compared on every token and every synonym with common plural endings. Prints one JSON
line; exit status 1 on any difference.
"""

import argparse
import json
import re
import sys
import types
from pathlib import Path

import nltk

from eval.metrics import singular
from eval.tasks import chair

CAPTIONS = [
    "A baby elephant walking behind an adult giraffe.",
    "A passenger jet flying over the city while a passenger train waits.",
    "A toilet with the seat up next to a sink. The toilet seat is white.",
    "A train track running through the field near home plate.",
    "Two hot-dogs and a hot dog on a plate next to a cup of coffee.",
    "Two policemen standing next to a bus and two buses.",
    "Cows and calves grazing in a field with sheep and lambs.",
    "A man with ties hanging on a rack, and a bow tie.",
    "A man riding a motor bike; a woman on a motor cycle.",
    "A stove top oven in a kitchen with a stovetop and a microwave.",
    "Two wine glasses and a wine glass on the dining table.",
    "A man's dog (a puppy) -- and two collies on the couch.",
    "Two teddy bears; a cell phone! An iPhone, a cheesecake and cupcakes.",
    "People at desks with laptops, computers, keyboards and mice.",
    "The image shows a kitchen with a refrigerator, an oven, a sink and several knives.",
    "**Objects**: a cat/dog, a 'bird', skis, a snowboard and tennis rackets.",
    "Children playing with kites and frisbees near parked cars and trucks.",
    "A plate of broccoli, carrots, oranges, apples, bananas and sandwiches.",
    "A bathroom with a toilet, a toothbrush, a hair drier and scissors.",
    "Several people riding horses and bicycles past fire hydrants and stop signs.",
    "A traffic light above a street light, with umbrellas and handbags below.",
    "Boats and surfboards on the beach, a kayak and a sailboat.",
    "Giraffes, zebras and elephants drink at a waterhole; a baby zebra and an adult bird watch.",
    "A clock on the wall above a vase with flowers and a potted plant by the bed.",
    "Two pizzas, a donut, a cake and a bowl of soup on a table with forks and spoons.",
    "A skateboarder in the air, a skier on skis, and a baseball bat, glove and ball.",
]


def load_singularize(pattern_clone: Path):
  source = (pattern_clone / "pattern" / "text" / "en" / "inflect.py").read_text()
  prepositions = source[source.index("plural_prepositions = "):source.index("# Inflection rules")]
  singular_part = source[source.index("singular_rules = ["):source.index("#### VERB CONJUGATION")]
  namespace = {"re": re, "NOUN": "NN"}
  exec(prepositions + "\n" + singular_part, namespace)  # pylint: disable=exec-used
  return namespace["singularize"]


def tokenizer():
  try:
    nltk.word_tokenize("a dog.")
    return nltk.word_tokenize
  except LookupError:  # no punkt data: its sentence split on ordinary captions (after . ! or ?,
    # closing quotes or brackets included), then Treebank
    treebank = nltk.tokenize.TreebankWordTokenizer()
    sentences = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"')\]])\s+")
    return lambda text: [t for s in sentences.split(text) for t in treebank.tokenize(s)]


def load_reference(clone: Path, singularize):
  source = (clone / "utils" / "chair.py").read_text()
  lines = []
  for line in source.splitlines():
    stripped = line.strip()
    if stripped.startswith(("print ", "from pattern.en", "from misc", "lemma = ")):
      line = line[:len(line) - len(line.lstrip())] + "pass"
    lines.append(line)
  fake_nltk = types.SimpleNamespace(word_tokenize=tokenizer())
  namespace = {"__name__": "reference_chair", "singularize": singularize, "os": __import__("os")}
  code = compile("\n".join(lines), str(clone / "utils" / "chair.py"), "exec")
  exec(code, namespace)  # pylint: disable=exec-used
  namespace["nltk"] = fake_nltk
  namespace["open"] = lambda path, *a: open(clone / path, *a)  # it opens data/synonyms.txt
  return namespace["CHAIR"]([], str(clone))


def captions_of(path: Path | None) -> list[str]:
  if path is None:
    return []
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  return [row.get("answer", row.get("caption", "")) for row in rows]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--hallucination", required=True, type=Path, help="LisaAnne/Hallucination")
  parser.add_argument("--pattern", required=True, type=Path, help="clips/pattern")
  parser.add_argument("--captions", type=Path, help="JSONL with answer or caption fields")
  args = parser.parse_args()
  reference_singularize = load_singularize(args.pattern)
  reference = load_reference(args.hallucination, reference_singularize)
  vocabulary = chair.read_vocabulary(args.hallucination / "data" / "synonyms.txt")

  captions = CAPTIONS + captions_of(args.captions)
  caption_diffs = []
  for caption in captions:
    theirs = reference.caption_to_words(caption)[1]
    ours = chair.mentions(caption, vocabulary)
    if theirs != ours:
      caption_diffs.append({"caption": caption, "reference": theirs, "ours": ours})

  words = {w for c in captions for w in re.findall(r"[a-z]+", c.lower())}
  for name in vocabulary.canonical:
    for word in name.split():
      words.update([word, word + "s", word + "es", word[:-1] + "ies", word[:-1] + "ves",
                    word[:-2] + "ves"])
  word_diffs = {w: [reference_singularize(w), singular.singularize(w)] for w in sorted(words)
                if reference_singularize(w) != singular.singularize(w)}
  print(json.dumps({"captions": len(captions), "caption_differences": caption_diffs,
                    "words": len(words), "singular_differences": word_diffs}))
  sys.exit(1 if caption_diffs or word_diffs else 0)


if __name__ == "__main__":
  main()
