"""eval.grounded_iou with tiny random GroundingDINO and SAM saved by save_pretrained and loaded by
from_pretrained: its IoUs are the grounded masks' against the binarised maps, computed here again."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fakes
from eval import tiny_grounding
from eval.metrics import iou
from eval.models import grounding
from sae_jax.formats.topacts import TopActs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  return tiny_grounding.save(tmp_path_factory.mktemp("grounding"))


@pytest.fixture
def inputs(tmp_path):
  acts = fakes.write_topacts(tmp_path / "topacts", num_latents=3, top_n=2, no_images=())
  explanations = tmp_path / "explanations.jsonl"
  records = [{"latent": 0, "status": "ok", "explanation": "A red Circle", "images": [0, 1]},
             {"latent": 1, "status": "ok", "explanation": "stripes", "images": None},
             {"latent": 2, "status": "unable", "explanation": None}]
  explanations.write_text("".join(json.dumps({"raw": "", "model": "m", **r}) + "\n"
                                  for r in records))
  return acts, explanations


def _run(acts, explanations, models, out, *extra):
  result = subprocess.run(
      [sys.executable, "-m", "eval.grounded_iou", f"--topacts={acts}",
       f"--explanations={explanations}", f"--grounding_dino={models['grounding_dino']}",
       f"--sam={models['sam']}", f"--out={out}", "--device=cpu", "--shown=2", *extra],
      capture_output=True, text=True, timeout=300, cwd=acts.parent)
  return result


def test_ious_are_those_of_the_grounded_masks(models, inputs, tmp_path):
  acts, explanations = inputs
  result = _run(acts, explanations, models, tmp_path / "out", "--box_threshold=0",
                "--text_threshold=0", "--threshold=0.7")
  assert result.returncode == 0, result.stderr[-3000:]
  rows = {r["latent"]: r for r in map(json.loads, open(tmp_path / "out" / "per_latent.jsonl"))}
  assert sorted(rows) == [0, 1]  # latent 2's explanation is "unable"
  grounder = grounding.Grounder(models["grounding_dino"], models["sam"], box_threshold=0.0,
                                text_threshold=0.0)
  topacts = TopActs(acts)
  for latent, text in ((0, "A red Circle"), (1, "stripes")):
    expected = []
    for rank, image_id in enumerate(topacts.latent(latent).image_ids):
      image = Image.open(acts / "images" / f"{image_id}.png").convert("RGB")
      boxes = grounder.boxes(image, text)
      mask = iou.mask_to_grid(grounder.mask(image, boxes), topacts.grid)
      pred = topacts.latent(latent).maps[rank] > 0.7
      expected.append(float(iou.iou(pred, mask)))
      assert len(boxes) > 1  # with no threshold, every query's box: the mask is their union
      assert np.array_equal(np.asarray(rows[latent]["images"][rank]["boxes"]), np.asarray(boxes))
    assert [image["iou"] for image in rows[latent]["images"]] == pytest.approx(expected)
    assert rows[latent]["iou"] == pytest.approx(np.mean(expected))
  summary = json.load(open(tmp_path / "out" / "grounded_iou.json"))
  assert summary["latents"] == {"selected": 2, "scored": 2, "skipped_no_images": 0,
                                "skipped_no_label": 0}
  assert summary["images"] == {"boxed": 4}
  assert summary["metrics"]["iou"]["mean"] == pytest.approx(np.mean([rows[0]["iou"],
                                                                     rows[1]["iou"]]))


def test_no_box_is_an_empty_mask(models, inputs, tmp_path):
  acts, explanations = inputs
  result = _run(acts, explanations, models, tmp_path / "out", "--box_threshold=1.01")
  assert result.returncode == 0, result.stderr[-3000:]
  rows = [json.loads(line) for line in open(tmp_path / "out" / "per_latent.jsonl")]
  # The first top image of every latent of fakes.write_topacts is active everywhere: IoU 0.
  assert [r["iou"] for r in rows] == [0.0, 0.0] and [r["random_iou"] for r in rows] == [0.0, 0.0]
  assert all(image["boxes"] == [] for r in rows for image in r["images"])


def test_the_mask_is_the_union_of_the_boxes_masks(models):
  grounder = grounding.Grounder(models["grounding_dino"], models["sam"])
  image = Image.new("RGB", (60, 40), (200, 30, 30))
  boxes = [[0.0, 0.0, 20.0, 20.0], [30.0, 10.0, 59.0, 39.0]]
  union = grounder.mask(image, boxes)
  assert union.shape == (40, 60)
  assert np.array_equal(union, grounder.mask(image, boxes[:1]) | grounder.mask(image, boxes[1:]))
  assert not grounder.mask(image, []).any()


def test_a_model_folder_that_does_not_load_is_named(models, inputs, tmp_path):
  acts, explanations = inputs
  result = _run(acts, explanations, {**models, "sam": models["grounding_dino"]}, tmp_path / "out")
  assert result.returncode == 1
  error = json.loads(result.stdout.strip().splitlines()[-1])["error"]
  assert error.startswith(f"--sam={models['grounding_dino']}: cannot load a SamModel")
