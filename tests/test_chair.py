"""CHAIR against its reference (LisaAnne/Hallucination utils/chair.py with nltk and pattern.en):
the expected mentions are the reference's, measured by running it on the same captions
(benchmarks/chair_compare.py, shared/research/chair-reference.md) or derived by hand from its
rules; and the COCO ground-truth tool."""

import json
import subprocess
import sys

import pytest

from eval.tasks import chair
from eval.metrics.singular import singularize

# The reference's synonyms.txt format, with its oddities: a doubled space (" motor bike" never
# matches), a capital ("iPhone"), a three-word name, a repeated name.
SYNONYMS = """person, girl, boy, man, woman, people, baby, adult, passenger, policeman, child
motorcycle, scooter,  motor bike, motor cycle, motorbike
airplane, jetliner, plane, air plane, jet
bus, minibus
train, locomotive
cow, cattle, calf, cattle
dog, puppy, collie
elephant
giraffe
tie, bow, bow tie
wine glass
cup
hot dog
teddy bear
cell phone, mobile phone, phone, iPhone
cake,  cheesecake, cupcake
chair, seat, stool
dining table, table, desk
toilet, urinal
sink
laptop, computer, notebook, laptop computer
oven, stovetop, stove, stove top oven
"""


@pytest.fixture
def vocabulary(tmp_path):
  path = tmp_path / "synonyms.txt"
  path.write_text(SYNONYMS)
  return chair.read_vocabulary(path)


@pytest.mark.parametrize("plural,singular", [
    ("buses", "bus"), ("bus", "bu"), ("glasses", "glass"), ("glass", "glas"), ("ties", "ty"),
    ("cookies", "cookies"), ("collies", "collies"), ("puppies", "puppy"), ("calves", "calf"),
    ("knives", "knife"), ("gloves", "glove"), ("shelves", "shelve"), ("policemen", "policeman"),
    ("women", "woman"), ("people", "person"), ("children", "child"), ("mice", "mouse"),
    ("geese", "goose"), ("oxen", "ox"), ("skis", "ski"), ("scissors", "scissors"),
    ("tennis", "tenni"), ("sheep", "sheep"), ("tomatoes", "tomato"), ("benches", "bench"),
    ("pasta", "pastum"), ("hot-dogs", "hot-dog"), ("mothers-in-law", "mother-in-law"),
    ("analyses", "analysis"), ("ice", "ice"), ("dog", "dog"),
])
def test_singularize_follows_pattern(plural, singular):
  assert singularize(plural) == singular


def test_synonyms_are_read_as_the_reference_reads_them(vocabulary):
  canonical = vocabulary.canonical
  assert canonical["stove top oven"] == "oven" and canonical["stovetop"] == "oven"
  assert canonical[" motor bike"] == "motorcycle" and "motor bike" not in canonical
  assert canonical["iPhone"] == "cell phone" and canonical["cattle"] == "cow"
  assert vocabulary.merges["dining table"] == "dining table"  # a two-word name of the file
  assert vocabulary.merges["bow tie"] == "tie"  # the reference's rule wins over the file's name
  assert "stove top oven" not in vocabulary.merges


@pytest.mark.parametrize("caption,expected", [
    # Measured with the reference (chair-reference.md):
    ("A baby elephant walking behind an adult giraffe.", ["elephant", "giraffe"]),
    ("A passenger jet flying over the city.", ["airplane"]),
    ("A passenger train at the station.", ["train"]),
    ("A toilet with the seat up next to a sink.", ["toilet", "sink"]),
    ("A train track running through the field.", []),
    ("Two hot-dogs on a plate next to a cup.", ["cup"]),
    ("Two policemen standing next to a bus.", ["person"]),
    ("Cows and calves grazing in a field.", ["cow", "cow"]),
    ("A man with ties hanging on a rack.", ["person"]),
    ("A man riding a motor bike.", ["person"]),
    # Derived from its rules:
    ("A stove top oven.", ["oven", "oven"]),  # "stove" and "oven"; "top" is no object
    ("Two wine glasses and a wine glass.", ["wine glass", "wine glass"]),  # "wine glas" rule
    ("Two buses, a bus and a minibus.", ["bus"]),  # "bus" -> "bu", "minibus" -> "minibu"
    ("A baby and an adult on a toilet seat.", ["person", "person", "toilet"]),
    ("A man's puppy (a collie) -- and two collies on the dining table.",
     ["person", "dog", "dog", "dining table"]),
    ("Two teddy bears; a cell phone! An iPhone, a bow tie and a cheesecake.",
     ["teddy bear", "cell phone", "tie"]),
    ("A PERSON at a table.\nPeople at desks.", ["person", "dining table", "person",
                                                "dining table"]),
    ("A cat/dog **dog** and a dog.", ["dog"]),  # nltk keeps "cat/dog" and "**dog**" whole
    ("Laptops, computers and a laptop computer.", ["laptop", "laptop", "laptop"]),  # "," parts
    ("A 'bird', a dog's bowl and the dogs' cats.", ["dog", "dog"]),  # "'bird" is no bird in nltk
])
def test_mentions_match_the_reference(vocabulary, caption, expected):
  assert chair.mentions(caption, vocabulary) == expected


def test_scores_on_hand_made_captions(vocabulary):
  captions = ["A man and two dogs near a bus.", "A hot dog on a table with cups.",
              "People wait next to the trains.", "Nothing here."]
  truths = [("person", "dog"), ("hot dog", "cup"), ("man",), ("buses",)]
  # Mentions: person, dog (bus -> "bu", none) | hot dog, dining table, cup | person, train | none.
  # Hallucinated: dining table (caption 2), train (caption 3). Truth 2 + 2 + 1 + 1 objects ("man"
  # -> person, "buses" -> bus); covered 2 + 2 + 1 + 0.
  scores = chair.scores(captions, truths, vocabulary)
  assert scores["mentions"] == 7
  assert scores["chair_i"] == pytest.approx(2 / 7) and scores["chair_s"] == pytest.approx(0.5)
  assert scores["recall"] == pytest.approx(5 / 6) and scores["length"] == pytest.approx(6.0)


def run_tool(*args):
  proc = subprocess.run([sys.executable, "-m", "eval.coco_objects", *args], capture_output=True,
                        text=True, timeout=120)
  return proc, json.loads(proc.stdout.strip().splitlines()[-1])


def test_coco_ground_truth_from_instances_and_captions(tmp_path):
  (tmp_path / "synonyms.txt").write_text(SYNONYMS)
  instances = {"images": [{"id": 7, "file_name": "b.jpg"}, {"id": 3, "file_name": "a.jpg"},
                          {"id": 9, "file_name": "c.jpg"}],
               "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"},
                              {"id": 67, "name": "dining table"}],
               "annotations": [{"image_id": 7, "category_id": 18},
                               {"image_id": 7, "category_id": 1},
                               {"image_id": 3, "category_id": 67},
                               {"image_id": 7, "category_id": 18},
                               {"image_id": 55, "category_id": 1}]}  # an image not listed
  captions = {"annotations": [{"image_id": 3, "caption": "Two puppies under a desk."},
                              {"image_id": 3, "caption": "A baby elephant."},
                              {"image_id": 9, "caption": "A bus by a toilet seat."}]}
  (tmp_path / "instances.json").write_text(json.dumps(instances))
  (tmp_path / "captions.json").write_text(json.dumps(captions))
  common = [f"--instances={tmp_path / 'instances.json'}",
            f"--vocabulary={tmp_path / 'synonyms.txt'}"]
  proc, summary = run_tool(*common, f"--captions={tmp_path / 'captions.json'}",
                           f"--out={tmp_path / 'items.jsonl'}")
  assert proc.returncode == 0 and summary["images"] == 3, proc.stderr[-2000:]
  rows = [json.loads(line) for line in (tmp_path / "items.jsonl").read_text().splitlines()]
  assert rows == [
      {"image": "a.jpg", "image_id": 3, "objects": ["dining table", "dog", "elephant"]},
      {"image": "b.jpg", "image_id": 7, "objects": ["dog", "person"]},
      {"image": "c.jpg", "image_id": 9, "objects": ["toilet"]}]  # "bus" -> "bu"; seat dropped
  items = chair.read_items(tmp_path / "items.jsonl")
  assert items[0].objects == ("dining table", "dog", "elephant")

  proc, summary = run_tool(*common, "--num_images=2", "--seed=1", f"--out={tmp_path / 's.jsonl'}")
  sample = [json.loads(line)["image_id"]
            for line in (tmp_path / "s.jsonl").read_text().splitlines()]
  assert proc.returncode == 0 and len(sample) == 2 and sample == sorted(sample)

  instances["categories"].append({"id": 90, "name": "toothbrush"})
  instances["annotations"].append({"image_id": 3, "category_id": 90})
  (tmp_path / "instances.json").write_text(json.dumps(instances))
  proc, summary = run_tool(*common, f"--out={tmp_path / 'bad.jsonl'}")
  assert proc.returncode == 1
  assert summary["error"].startswith("COCO category 'toothbrush' is not in --vocabulary=")
