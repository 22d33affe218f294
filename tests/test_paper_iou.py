"""eval.grounded_iou --method=paper against references computed another way: the paper's mask from a
float64 numpy bilinear upsampling (PIL's pixel-centre convention), the random images drawn with the
paper's own call (torch.randint after torch.manual_seed), the random images' maps from a float64
numpy TopK encoding of the store's rows. benchmarks/paper_iou_compare.py runs the paper's own
functions from a clone on the same inputs."""

import functools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import reference
from eval import tiny_grounding
from eval.metrics import paper_iou
from eval.models import grounding
from sae_jax.formats import dictionary
from sae_jax.store import KIND_IMAGE_BASE, KIND_TEXT, META_DTYPE, StoreWriter
from sae_jax.formats.topacts import TopActs

ROOT = Path(__file__).resolve().parents[1]
D, N_LATENTS, K, GRID = 8, 12, 3, (24, 24)


def bilinear_weights(size_in: int, size_out: int) -> np.ndarray:
  """[out, in] weights of PIL's bilinear upsampling: output pixel x samples the input at
  (x + 0.5) * in / out - 0.5 with a triangle of half-width 1, normalised at the borders."""
  centre = (np.arange(size_out) + 0.5) * size_in / size_out
  weights = np.maximum(0.0, 1.0 - np.abs(np.arange(size_in)[None, :] + 0.5 - centre[:, None]))
  return weights / weights.sum(1, keepdims=True)


def reference_active(patch_map: np.ndarray, size: int = 336) -> np.ndarray:
  inactive = np.where(patch_map.reshape(GRID) < 1e-5, 224.0, 0.0)
  wy, wx = bilinear_weights(GRID[0], size), bilinear_weights(GRID[1], size)
  return np.floor(wy @ inactive @ wx.T + 0.5) < 224


@pytest.mark.parametrize("seed", [0, 1])
def test_active_pixels_are_the_bilinear_upsampled_mask_below_224(seed):
  rng = np.random.default_rng(seed)
  patch_map = rng.uniform(0, 1, 576) * (rng.uniform(size=576) < 0.1)
  patch_map[rng.integers(576)] = 0.5e-5  # fired, but below the paper's cut
  assert np.array_equal(paper_iou.active_pixels(patch_map, GRID), reference_active(patch_map))
  single = np.zeros(576)
  single[10 * 24 + 10] = 1.0
  # One active patch (14 x 14 px) grows by half a patch on each side, less the faint corners.
  assert 700 < paper_iou.active_pixels(single, GRID).sum() < 28 * 28


def test_latent_iou_counts_an_ungrounded_image_as_zero():
  assert paper_iou.latent_iou([0.5, None, 0.25, None]) == pytest.approx(0.1875)
  assert np.isnan(paper_iou.pixel_iou(np.zeros(4, bool), np.zeros(4, bool)))


def test_random_draws_are_the_papers_torch_randint_sequence():
  draws = paper_iou.random_draws(50, 5, 3, 4, seed=7)
  torch.manual_seed(7)
  expected = [[torch.randint(0, 50, (5,)).tolist() for _ in range(4)] for _ in range(3)]
  assert draws.tolist() == expected


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("paper_iou")
  rng = np.random.default_rng(0)
  params = {"W_enc": rng.normal(size=(N_LATENTS, D)), "b_enc": rng.normal(size=N_LATENTS) - 1.5,
            "W_dec": rng.normal(size=(N_LATENTS, D)), "b_dec": rng.normal(size=D) * 0.1}
  export = dictionary.write(root / "export", "model.layers.0", params, k=K, layout="sparsify")
  writer = StoreWriter(root / "store", {"model": "synthetic", "hookpoint": "model.layers.0",
                                        "layer": 0, "d_model": D, "dtype": "float32",
                                        "settings": {}})
  (root / "images").mkdir()
  patches = GRID[0] * GRID[1]
  for shard in range(2):
    acts, metas, records = [], [], []
    for image_id in range(shard * 4, shard * 4 + 4):
      Image.new("RGB", (60 + 10 * image_id, 40), (40 * image_id % 256, 90, 160)).save(
          root / "images" / f"{image_id}.png")
      acts.append(rng.normal(size=(patches + 1, D)).astype(np.float32))
      meta = np.zeros(patches + 1, META_DTYPE)
      meta["image_id"], meta["kind"] = image_id, [KIND_TEXT] + [KIND_IMAGE_BASE] * patches
      meta["patch"] = [-1, *range(patches)]
      metas.append(meta)
      records.append({"id": image_id, "source": str(root / "images" / f"{image_id}.png"),
                      "grid": list(GRID)})
    writer.write_shard(np.concatenate(acts), np.concatenate(metas), records, num_inputs=4)
  writer.finish()
  result = subprocess.run([sys.executable, "-m", "sae_jax.scan", f"--sae={export}",
                           f"--store={root / 'store'}", f"--out={root / 'topacts'}", "--top_n=2"],
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  models = tiny_grounding.save(root / "grounding")
  latents = [int(i) for i in np.flatnonzero(TopActs(root / "topacts").has_images)[:2]]
  (root / "explanations.jsonl").write_text("".join(json.dumps(
      {"latent": i, "status": "ok", "explanation": f"Long text {i}", "raw": "", "model": "m",
       "images": None}) + "\n" for i in latents))
  (root / "labels.jsonl").write_text("".join(json.dumps(
      {"latent": i, "status": "ok", "label": ["red circle", "blue stripes"][n]}) + "\n"
      for n, i in enumerate(latents)))
  return root, params, export, models, latents


def test_paper_method_against_references(setup):
  root, params, export, models, latents = setup
  out = root / "out"
  result = subprocess.run(
      [sys.executable, "-m", "eval.grounded_iou", "--method=paper", f"--topacts={root / 'topacts'}",
       f"--explanations={root / 'explanations.jsonl'}", f"--labels={root / 'labels.jsonl'}",
       f"--store={root / 'store'}", f"--sae={export}", f"--grounding_dino={models['grounding_dino']}",
       f"--sam={models['sam']}", f"--out={out}", "--device=cpu", "--shown=2", "--random_draws=2",
       "--box_threshold=0", "--text_threshold=0", "--seed=3", "--bootstrap=0"],
      capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = {r["latent"]: r for r in map(json.loads, open(out / "per_latent.jsonl"))}
  grounder = grounding.Grounder(models["grounding_dino"], models["sam"], box_threshold=0.0,
                                text_threshold=0.0)
  topacts = TopActs(root / "topacts")
  store_acts = np.concatenate([np.load(p) for p in sorted((root / "store" / "shards").glob(
      "*.acts.npy"))])
  store_meta = np.concatenate([np.load(p) for p in sorted((root / "store" / "shards").glob(
      "*.meta.npy"))])

  @functools.cache  # the same (image, label) recurs among the top and the random images
  def target(image_id, label):
    image = Image.open(root / "images" / f"{image_id}.png").resize((336, 336)).convert("RGB")
    boxes = [[int(v) for v in b] for b in grounder.boxes(image, label)]
    assert boxes  # no threshold: every query gives boxes
    return grounder.mask(image, boxes, multimask=True)

  def iou(pred, mask):
    return (pred & mask).sum() / (pred | mask).sum()

  torch.manual_seed(3)  # the paper's draws: 2 trials, the latents in order, 2 images each
  draws = [[torch.randint(0, 8, (2,)).tolist() for _ in latents] for _ in range(2)]
  for n, latent in enumerate(latents):
    label = rows[latent]["label"]
    expected = [iou(reference_active(topacts.latent(latent).maps[rank]), target(image_id, label))
                for rank, image_id in enumerate(topacts.latent(latent).image_ids[:2])]
    assert [i["iou"] for i in rows[latent]["images"]] == pytest.approx(expected, abs=1e-12)
    assert rows[latent]["iou"] == pytest.approx(np.mean(expected), abs=1e-12)
    trials = []
    for trial in draws:
      values = []
      for image_id in trial[n]:
        sel = np.flatnonzero((store_meta["image_id"] == image_id)
                             & (store_meta["kind"] == KIND_IMAGE_BASE))
        values_k, indices_k = reference.encode_numpy(params, store_acts[sel], K)
        patch_map = np.where(indices_k == latent, values_k, 0.0).sum(1)[np.argsort(
            store_meta["patch"][sel])]
        values.append(iou(reference_active(patch_map), target(image_id, label)))
      trials.append(np.mean(values))
    assert rows[latent]["random_trials"] == pytest.approx(trials, abs=1e-12)
    assert rows[latent]["random_iou"] == pytest.approx(np.mean(trials), abs=1e-12)
  summary = json.load(open(out / "grounded_iou.json"))
  assert summary["settings"]["method"] == "paper" and summary["settings"]["pixels"] == 336


def test_paper_method_needs_labels_store_and_sae(setup):
  root, _, _, models, _ = setup
  result = subprocess.run(
      [sys.executable, "-m", "eval.grounded_iou", "--method=paper", f"--topacts={root / 'topacts'}",
       f"--explanations={root / 'explanations.jsonl'}", f"--grounding_dino={models['grounding_dino']}",
       f"--sam={models['sam']}", f"--out={root / 'bad'}"],
      capture_output=True, text=True, timeout=120, cwd=ROOT)
  assert result.returncode == 1
  assert "--method=paper needs --labels" in json.loads(result.stdout.strip().splitlines()[-1])["error"]
