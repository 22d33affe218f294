"""eval.metrics.paper_iou (`eval.grounded_iou --method=paper`) against the paper's own code, latent by latent.

Not part of the project: it runs the paper's functions from a clone (nothing of theirs is stored here):

  git clone https://github.com/EvolvingLMMs-Lab/multimodal-sae /tmp/multimodal-sae
  python -m eval.tiny_grounding --out=/tmp/grounding     # or real GroundingDINO and SAM folders
  PYTHONPATH=. python benchmarks/paper_iou_compare.py --paper_clone=/tmp/multimodal-sae \
      --grounding_dino=/tmp/grounding/grounding_dino --sam=/tmp/grounding/sam

The clone's `features/features.py` (`upsample_mask`, `prepare_image_examples`),
`features/constructors.py` (`random_activations_image`), `agents/scorers/segment/utils.py`
(`DetectionResult`, `get_boxes`, `refine_masks`) and `SegmentScorer`'s `__call__`, `detect`, `segment`
and `_calculate_iou` are read from their files and executed as they are (only the definitions: their
modules import packages the project does not need). Their scorer grounds with the transformers
zero-shot-object-detection pipeline and AutoModelForMaskGeneration on the same local model folders.
Inputs are synthetic: images of different sizes and shapes, each latent with sparse maps on every
image (its top images are its 5 largest by mean activation, as theirs); labels from the tiny models'
vocabulary. The random baseline: their random_activations_image per latent, trial by trial, after
torch.manual_seed(seed), against ours from the same seed. (All their draws are made before their
scoring: in their run the transformers pipeline takes a DataLoader seed from torch's global generator
on every call, so their draws also depend on how many calls came before; the distribution, uniform
with replacement, is the same.) Prints one JSON line; exit status 1 when any IoU differs by more
than 1e-9.
"""

import argparse
import ast
import dataclasses
import json
import sys
import types
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm
from transformers import AutoModelForMaskGeneration, AutoProcessor, pipeline

from eval.metrics import paper_iou
from eval.models import grounding

GRID = (24, 24)
LABELS = ["red circle", "blue square", "green stripes", "red line", "a triangle", "blue circle"]


def definitions(path: Path, names: set[str], namespace: dict, class_methods: dict | None = None):
  """Executes the top-level definitions `names` of a source file in `namespace`; for a class in
  `class_methods`, only the listed methods of it."""
  tree = ast.parse(path.read_text())
  body = []
  for node in tree.body:
    if getattr(node, "name", None) not in names:
      continue
    if class_methods and node.name in class_methods:
      node.body = [n for n in node.body if getattr(n, "name", None) in class_methods[node.name]]
      node.bases = []
    body.append(node)
  missing = names - {n.name for n in body}
  if missing:
    raise SystemExit(f"--paper_clone: {path} lacks {sorted(missing)}")
  exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec"), namespace)  # pylint: disable=exec-used
  return namespace


class _TensorType:
  def __class_getitem__(cls, item):
    return cls


def load_paper(clone: Path) -> dict:
  root = clone / "sae_auto_interp"
  ns = {"np": np, "torch": torch, "Image": Image, "dataclass": dataclasses.dataclass, "Any": Any,
        "Dict": Dict, "List": List, "Optional": Optional, "Tuple": Tuple, "Union": Union,
        "TypeVar": __import__("typing").TypeVar, "TensorType": _TensorType, "tqdm": tqdm,
        "AutoProcessor": AutoProcessor, "AutoModelForMaskGeneration": AutoModelForMaskGeneration,
        "pipeline": pipeline, "logger": types.SimpleNamespace(info=lambda *a: None),
        # names their signatures annotate with
        "FeatureRecord": object, "BufferOutput": object, "Dataset": object, "FeatureConfig": object}
  definitions(root / "agents" / "scorers" / "segment" / "utils.py",
              {"BoundingBox", "DetectionResult", "get_boxes", "refine_masks"}, ns)
  definitions(root / "features" / "features.py",
              {"Example", "ImageExample", "prepare_image_examples", "upsample_mask"}, ns)
  definitions(root / "features" / "constructors.py", {"random_activations_image"}, ns)
  definitions(root / "agents" / "scorers" / "segment" / "segment_scorer.py", {"SegmentScorer"}, ns,
              {"SegmentScorer": {"load_model", "__call__", "_calculate_iou",
                                 "grounded_segmentation", "detect", "segment"}})
  return ns


def synthetic(num_images: int, num_latents: int, seed: int):
  """Images (sizes and shapes vary, one coloured object each) and maps [latents, images, 576]."""
  rng = np.random.default_rng(seed)
  images = []
  for i in range(num_images):
    w, h = int(rng.integers(120, 400)), int(rng.integers(120, 400))
    image = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(0, 255, 3)))
    x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
    ImageDraw.Draw(image).ellipse([x0, y0, x0 + w // 3, y0 + h // 3],
                                  fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    images.append(image)
  density = rng.uniform(0.01, 0.3, (num_latents, num_images, 1))
  maps = rng.uniform(0, 3, (num_latents, num_images, 576)) * (
      rng.uniform(size=(num_latents, num_images, 576)) < density)
  maps[rng.uniform(size=(num_latents, num_images)) < 0.5] = 0.0  # silent on half of the images
  return images, maps.astype(np.float32)


class _Tokens:
  """The two things their constructors use of a datasets.Dataset: len() and select()["image"]."""

  def __init__(self, images):
    self.images = images

  def __len__(self):
    return len(self.images)

  def select(self, indices):
    return {"image": [self.images[int(i)] for i in indices]}


def paper_scores(ns, clone_args, images, maps, top, labels, trials, seed) -> tuple[list, list]:
  """(per latent [ious], per trial per latent avg) from their scorer and random constructor."""
  scorer = ns["SegmentScorer"].__new__(ns["SegmentScorer"])
  scorer.detector_id, scorer.segmentor_id = clone_args.grounding_dino, clone_args.sam
  scorer.device, scorer.threshold, scorer.rank = "cpu", clone_args.box_threshold, 1
  scorer.processor = AutoProcessor.from_pretrained(clone_args.sam)
  scorer.load_model()
  scorer.features = [f"latent{j}" for j in range(len(maps))]
  scorer.explanation = {f"latent{j}": labels[j] for j in range(len(maps))}
  processor = types.SimpleNamespace(num_image_tokens=576)
  tokens = _Tokens(images)

  def record(j, examples):
    return types.SimpleNamespace(feature=f"latent{j}", examples=examples)

  def top_records():
    fake = torch.zeros(len(images), 8000)
    dense = torch.zeros(len(images), 8000)
    out = []
    for j in range(len(maps)):
      dense[:, :576] = torch.from_numpy(maps[j])
      out.append(record(j, ns["prepare_image_examples"](
          fake[top[j]], dense[top[j]].clone(), [images[i] for i in top[j]], processor)))
    return [out]

  scorer.loader = top_records
  top_scores = [s["iou_scores"] for s in scorer()]
  cfg = types.SimpleNamespace(max_examples=5)
  # Every draw first: the transformers pipeline takes a seed from torch's global generator on each
  # call (its DataLoader), so drawing between their scoring calls would shift the sequence.
  torch.manual_seed(seed)
  trial_records = []
  for _ in range(trials):
    records = []
    for j in range(len(maps)):
      rows, cols = np.nonzero(maps[j])
      buffer = types.SimpleNamespace(
          locations=torch.from_numpy(np.stack([rows, cols], 1).astype(np.int64)),
          activations=torch.from_numpy(maps[j][rows, cols]))
      rec = record(j, None)
      ns["random_activations_image"](rec, buffer, tokens, cfg, processor)
      records.append(rec)
    trial_records.append(records)
  random_scores = []
  for records in trial_records:
    scorer.loader = lambda records=records: [records]
    random_scores.append([s["avg_iou"] for s in scorer()])
  return top_scores, random_scores


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--paper_clone", required=True, type=Path)
  parser.add_argument("--grounding_dino", required=True)
  parser.add_argument("--sam", required=True)
  parser.add_argument("--box_threshold", type=float, default=0.3)
  parser.add_argument("--images", type=int, default=24)
  parser.add_argument("--latents", type=int, default=6)
  parser.add_argument("--trials", type=int, default=10)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  ns = load_paper(args.paper_clone)
  images, maps = synthetic(args.images, args.latents, args.seed)
  labels = [LABELS[j % len(LABELS)] for j in range(args.latents)]
  top = [list(np.argsort(-maps[j].mean(1), kind="stable")[:5]) for j in range(args.latents)]
  theirs_top, theirs_random = paper_scores(ns, args, images, maps, top, labels, args.trials,
                                           args.seed)

  grounder = grounding.Grounder(args.grounding_dino, args.sam, "cpu", args.box_threshold, 0.0)
  cache = {}

  def ours(j, i):
    if (j, i) not in cache:
      cache[j, i] = paper_iou.image_iou(grounder, images[i], labels[j], maps[j][i], GRID)[1]
    return cache[j, i]

  ours_top = [[ours(j, i) for i in top[j]] for j in range(args.latents)]
  draws = paper_iou.random_draws(len(images), 5, args.trials, args.latents, args.seed)
  ours_random = [[paper_iou.latent_iou([ours(j, int(i)) for i in draws[t, j]])
                  for j in range(args.latents)] for t in range(args.trials)]

  # Theirs: -1 where grounding failed (ours: None); the latent's average counts it 0.
  as_theirs = lambda v: -1.0 if v is None else v
  top_diff = max(abs(as_theirs(o) - t) for os_, ts in zip(ours_top, theirs_top)
                 for o, t in zip(os_, ts))
  theirs_top_avg = [(sum(ts) + sum(t == -1 for t in ts)) / len(ts) for ts in theirs_top]
  ours_top_avg = [paper_iou.latent_iou(os_) for os_ in ours_top]
  random_diff = float(np.nanmax(np.abs(np.asarray(ours_random) - np.asarray(theirs_random))))
  avg_diff = float(np.nanmax(np.abs(np.asarray(ours_top_avg) - np.asarray(theirs_top_avg))))
  grounded = sum(v is not None for os_ in ours_top for v in os_)
  nan_positions_agree = np.array_equal(np.isnan(np.asarray(ours_random, float)),
                                       np.isnan(np.asarray(theirs_random, float)))
  same = bool(max(top_diff, random_diff, avg_diff) <= 1e-9 and nan_positions_agree)
  print(json.dumps({
      "same": same, "latents": args.latents, "images": args.images, "trials": args.trials,
      "top_images_grounded": f"{grounded}/{args.latents * 5}",
      "max_abs_diff": {"image_iou": top_diff, "latent_iou": avg_diff, "random_trial_iou": random_diff},
      "iou_mean": {"ours": float(np.mean(ours_top_avg)), "theirs": float(np.mean(theirs_top_avg))},
      "random_iou_mean": {"ours": float(np.mean(ours_random)),
                          "theirs": float(np.mean(theirs_random))}}))
  sys.exit(0 if same else 1)


if __name__ == "__main__":
  main()
