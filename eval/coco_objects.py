"""`python -m eval.coco_objects`: CHAIR's ground-truth objects of COCO images, as a caption file.

  python -m eval.coco_objects --instances=coco/annotations/instances_val2014.json \
      --captions=coco/annotations/captions_val2014.json \
      --vocabulary=Hallucination/data/synonyms.txt --num_images=500 --seed=0 \
      --out=chair_val2014_500.jsonl

As the reference (LisaAnne/Hallucination `utils/chair.py`, `get_annotations`) builds them: an
image's objects are the canonical names of its instance annotations' categories, plus every object
that eval/tasks/chair.py's matching finds in its reference captions. Several --instances/--captions files
are merged (the reference reads train2014 and val2014 together). Writes one
`{"image": file_name, "image_id", "objects"}` line per image, in image-id order, which
`python -m eval.hallucination --task=chair --questions=OUT --image_root=coco/val2014` reads.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from absl import flags

from eval.tasks import chair
from eval.tasks.pope import QuestionError
from sae_jax import cli

_INSTANCES = flags.DEFINE_list("instances", None, "COCO instance annotation files "
                               "(instances_val2014.json, ...).", required=True)
_CAPTIONS = flags.DEFINE_list("captions", [], "COCO caption annotation files "
                              "(captions_val2014.json, ...); the reference uses them.")
_VOCABULARY = flags.DEFINE_string("vocabulary", None, "CHAIR synonyms file (the reference's "
                                  "data/synonyms.txt).", required=True)
_NUM_IMAGES = flags.DEFINE_integer("num_images", 0, "A random sample of this many images of the "
                                   "instance files (0: all).", lower_bound=0)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the sample.")
_OUT = flags.DEFINE_string("out", None, "Output JSONL file.", required=True)


def read_json(path: str, keys: tuple[str, ...]) -> dict:
  try:
    data = json.loads(Path(path).read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise QuestionError(f"{path}: {e}") from e
  missing = [k for k in keys if not isinstance(data, dict) or k not in data]
  if missing:
    raise QuestionError(f"{path}: not a COCO annotation file (no {', '.join(missing)})")
  return data


def ground_truth(instances: list[dict], captions: list[dict],
                 vocabulary: chair.Vocabulary) -> dict[int, tuple[str, set[str]]]:
  """{image id: (file name, objects)} of every image of the instance files."""
  images = {im["id"]: (im["file_name"], set()) for data in instances for im in data["images"]}
  for data in instances:
    names = {c["id"]: c["name"] for c in data["categories"]}
    for annotation in data["annotations"]:
      name = names[annotation["category_id"]]
      if name not in vocabulary.canonical:
        raise QuestionError(f"COCO category {name!r} is not in --vocabulary={_VOCABULARY.value}")
      if annotation["image_id"] in images:
        images[annotation["image_id"]][1].add(vocabulary.canonical[name])
  for data in captions:
    for annotation in data["annotations"]:
      if annotation["image_id"] in images:
        images[annotation["image_id"]][1].update(chair.mentions(annotation["caption"], vocabulary))
  return images


def main():
  vocabulary = chair.read_vocabulary(_VOCABULARY.value)
  images = ground_truth([read_json(p, ("images", "annotations", "categories"))
                         for p in _INSTANCES.value],
                        [read_json(p, ("annotations",)) for p in _CAPTIONS.value], vocabulary)
  ids = sorted(images)
  if _NUM_IMAGES.value:
    if _NUM_IMAGES.value > len(ids):
      raise QuestionError(f"--num_images={_NUM_IMAGES.value}, but the instance files hold "
                          f"{len(ids)} images")
    ids = sorted(random.Random(_SEED.value).sample(ids, _NUM_IMAGES.value))
  if not ids:
    raise QuestionError(f"--instances={','.join(_INSTANCES.value)} hold no images")
  out = Path(_OUT.value)
  out.parent.mkdir(parents=True, exist_ok=True)
  with open(out, "w") as f:
    f.writelines(json.dumps({"image": images[i][0], "image_id": i,
                             "objects": sorted(images[i][1])}) + "\n" for i in ids)
  print(json.dumps({"ok": True, "out": str(out), "images": len(ids),
                    "objects_per_image": sum(len(images[i][1]) for i in ids) / len(ids)}))


if __name__ == "__main__":
  cli.run(main, (QuestionError,))
