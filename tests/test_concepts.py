"""Planted concepts: harvest.images records what it drew; eval.concepts finds latents that fire on it."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harvest import images
from sae_jax.formats import topacts

ROOT = Path(__file__).resolve().parents[1]


def test_recorded_masks_are_what_the_image_shows(tmp_path):
  images.write_synthetic_images(tmp_path, 30)
  scenes = [json.loads(line) for line in open(images.write_concepts(tmp_path, 30))]
  assert [s["image"] for s in scenes] == sorted(p.name for p in tmp_path.glob("*.png"))
  for scene in scenes:
    pixels = np.asarray(Image.open(tmp_path / scene["image"]), np.int64)
    background, _ = images._scene(scene["seed"])
    masks = images.concept_masks(scene)
    texture = masks[f"texture:{scene['texture']}"]
    assert np.array_equal(pixels[texture], background[texture])
    assert pixels.shape[:2] == texture.shape == (scene["size"][1], scene["size"][0])
    for name, mask in masks.items():
      if name.startswith("colour:"):  # every pixel there shows a fill of that colour's name
        assert {images.colour_name(p) for p in pixels[mask]} == {name[len("colour:"):]}
      assert not (mask & texture).any() or name == f"texture:{scene['texture']}"


def test_a_folder_of_other_scenes_is_refused(tmp_path):
  """Existing PNGs are kept on a rerun, so a folder drawn from another seed or style must not
  be topped up: its concepts.jsonl would no longer say what its images show."""
  def write(num, seed, style):  # as `python -m harvest.images` does
    images.write_concepts(tmp_path, num, seed, style)
    images.write_synthetic_images(tmp_path, num, seed, style)

  write(4, 3, "world")
  before = {p.name: p.read_bytes() for p in tmp_path.glob("*.png")}
  write(6, 3, "world")  # the same scenes, more of them
  assert [json.loads(line)["seed"] for line in open(tmp_path / images.CONCEPTS_FILE)] == \
      list(range(3, 9))
  for seed, style in ((4, "world"), (3, "varied")):
    for writer in (images.write_concepts, images.write_synthetic_images):
      with pytest.raises(images.OtherScenesError, match="00000.png was drawn from seed 3"):
        writer(tmp_path, 6, seed, style)
  assert {p.name: p.read_bytes() for p in tmp_path.glob("*.png")}.items() >= before.items()
  assert [json.loads(line)["seed"] for line in open(tmp_path / images.CONCEPTS_FILE)] == \
      list(range(3, 9))
  run = subprocess.run([sys.executable, "-m", "harvest.images", f"--out={tmp_path}", "--num=6",
                        "--seed=1", "--style=world"], capture_output=True, text=True, cwd=ROOT)
  assert run.returncode == 1
  assert json.loads(run.stdout)["error"].endswith("write to another --out")


def _shape(kind, colour, box):
  return {"shape": kind, "colour": colour, "rgb": list(images.COLOURS[colour]), "box": box,
          "line_width": None}


# 40x40 images on a 4x4 grid: a patch is 10x10 pixels, patch p is row p // 4, column p % 4.
SCENES = [
    {"image": "a.png", "size": [40, 40], "texture": "flat",
     "shapes": [_shape("rectangle", "red", [0, 0, 19, 19])]},                   # patches 0 1 4 5
    {"image": "b.png", "size": [40, 40], "texture": "flat",
     "shapes": [_shape("ellipse", "red", [20, 0, 39, 19]),                      # 2 3 6 7
                _shape("rectangle", "blue", [20, 20, 39, 39])]},                # 10 11 14 15
    {"image": "c.png", "size": [40, 40], "texture": "flat",
     "shapes": [_shape("rectangle", "blue", [0, 20, 19, 39]),                   # 8 9 12 13
                {**_shape("line", "green", [25, 5, 35, 5]), "line_width": 1}]},  # no whole patch
]
RECTANGLES = [{0, 1, 4, 5}, {10, 11, 14, 15}, {8, 9, 12, 13}]


def _write_topacts(path):
  """Latent 0 fires exactly on the rectangles (and on an unlabelled image), latent 1 everywhere,
  latent 2 has two labelled top images (too few), latent 3 none."""
  path.mkdir()
  maps = np.zeros((4, 4, 16), np.float32)
  for n, patches in enumerate(RECTANGLES):
    maps[0, n, list(patches)] = 1.0
  maps[0, 3, :] = 1.0
  maps[1, :3] = 0.5
  maps[2, :2, 0] = 1.0
  ids = np.array([[0, 1, 2, 3], [0, 1, 2, -1], [0, 1, -1, -1], [-1] * 4])
  edges = [1e-3, 1.0, 10.0]
  header = {"num_latents": 4, "top_n": 4, "grid": [4, 4], "hist_edges": edges, "score": "mean"}
  topacts.write(path, header, {"top_images": ids, "top_scores": maps.mean(-1), "top_maps": maps,
                               "density": np.full(4, 0.1), "histogram": np.zeros((4, 2))},
                [{"id": i, "source": f"somewhere/{name}", "grid": [4, 4]}
                 for i, name in enumerate(["a.png", "b.png", "c.png", "unlabelled.png"])])


@pytest.fixture
def planted(tmp_path):
  _write_topacts(tmp_path / "topacts")
  concepts = tmp_path / "images" / images.CONCEPTS_FILE
  concepts.parent.mkdir()
  concepts.write_text("".join(json.dumps(s) + "\n" for s in SCENES))
  explanations = tmp_path / "explanations.jsonl"
  explanations.write_text(json.dumps({"latent": 0, "status": "ok", "explanation": "<b>boxes</b>",
                                      "raw": "", "model": "m", "images": [0]}) + "\n")
  return tmp_path, concepts, explanations


def _run(*args):
  return subprocess.run([sys.executable, "-m", "eval.concepts", *args], capture_output=True,
                        text=True, timeout=120, cwd=ROOT)


def test_a_latent_on_one_concept_matches_it_with_iou_one(planted):
  folder, concepts, explanations = planted
  result = _run(f"--topacts={folder / 'topacts'}", f"--concepts={concepts.parent}",
                f"--explanations={explanations}", f"--out={folder / 'out'}")
  assert result.returncode == 0, result.stderr[-2000:] + result.stdout
  rows = {r["latent"]: r for r in map(json.loads, open(folder / "out" / "per_latent.jsonl"))}
  assert sorted(rows) == [0, 1]  # latent 2: two labelled images, under --min_images=3
  assert rows[0]["concept"] == "shape:rectangle" and rows[0]["iou"] == 1.0
  assert rows[0]["images"] == 3  # unlabelled.png is left out
  assert rows[0]["explanation"] == "<b>boxes</b>"
  # Latent 1 covers the whole grid; the flat background is 12, 8 and 12 of its 16 patches, and
  # moving every patch of a full map changes nothing.
  assert rows[1]["concept"] == "texture:flat"
  assert rows[1]["iou"] == pytest.approx((12 / 16 + 8 / 16 + 12 / 16) / 3)
  assert rows[1]["random_iou"] == pytest.approx(rows[1]["iou"])
  assert rows[0]["random_iou"] < 0.5
  summary = json.load(open(folder / "out" / "concepts.json"))
  # Matched (IoU >= 0.5): rectangle (latent 0: 1), flat (latent 1: 2/3), blue (latent 0: the blue
  # rectangles of b and c, none in a: 2/3). Red reaches 1/3 (latent 0), the ellipse 1/12 (latent 1).
  assert summary["planted"] == 5 and summary["matched"] == 3  # the thin green line is not planted
  assert "shape:line" not in summary["concepts"] and "colour:green" not in summary["concepts"]
  assert {name for name, c in summary["concepts"].items() if c["matched"]} == {
      "shape:rectangle", "texture:flat", "colour:blue"}
  assert summary["concepts"]["colour:red"]["iou"] == pytest.approx(1 / 3)
  assert summary["concepts"]["shape:ellipse"]["iou"] == pytest.approx(1 / 12)
  assert summary["metrics"]["iou"]["mean"] == pytest.approx((1 + 2 / 3) / 2)


def test_a_bad_concepts_line_is_named(planted):
  folder, concepts, _ = planted
  concepts.write_text(json.dumps(SCENES[0]) + "\n{\"image\": \"b.png\"}\n")
  result = _run(f"--topacts={folder / 'topacts'}", f"--concepts={concepts}",
                f"--out={folder / 'out'}")
  assert result.returncode == 1
  error = json.loads(result.stdout)["error"]
  assert error.startswith(f"--concepts={concepts}:2: not a scene record")
