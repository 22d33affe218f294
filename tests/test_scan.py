"""The latent scan against a float64 numpy reference, and its resume after kill -9."""

import json
import subprocess
import sys

import numpy as np
import pytest

import reference

from sae_jax import dictionary
from sae_jax.store import KIND_IMAGE_BASE, KIND_TEXT, META_DTYPE, StoreWriter

D, N_LATENTS, K, GRID = 8, 32, 3, (2, 3)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("scan")
  rng = np.random.default_rng(0)
  params = {"W_enc": rng.normal(size=(N_LATENTS, D)), "b_enc": rng.normal(size=N_LATENTS) * 0.1,
            "W_dec": rng.normal(size=(N_LATENTS, D)), "b_dec": rng.normal(size=D) * 0.1}
  params["W_dec"] /= np.linalg.norm(params["W_dec"], axis=1, keepdims=True)
  export = dictionary.write(root / "export", "model.layers.0", params, k=K, layout="sparsify")
  writer = StoreWriter(root / "store", {"model": "synthetic", "hookpoint": "model.layers.0",
                                        "layer": 0, "d_model": D, "dtype": "float32",
                                        "settings": {}})
  grid = GRID[0] * GRID[1]
  image_id = 0
  for _ in range(3):  # 3 shards of 7 images; each image: one text row then its base patches
    acts, metas, records = [], [], []
    for _ in range(7):
      x = rng.normal(size=(grid + 1, D)).astype(np.float32)
      meta = np.zeros(grid + 1, META_DTYPE)
      meta["image_id"] = image_id
      meta["kind"] = [KIND_TEXT] + [KIND_IMAGE_BASE] * grid
      meta["patch"] = [-1, *range(grid)]
      acts.append(x), metas.append(meta)
      records.append({"id": image_id, "source": f"{image_id}.png", "grid": list(GRID)})
      image_id += 1
    writer.write_shard(np.concatenate(acts), np.concatenate(metas), records, num_inputs=7)
  writer.finish()
  return root, params, export


def scan(root, export, out, *extra, check=True):
  result = subprocess.run([sys.executable, "-m", "sae_jax.scan", f"--sae={export}",
                           f"--store={root / 'store'}", f"--out={out}", "--top_n=4",
                           "--chunk_images=2", *extra], capture_output=True, text=True, timeout=300)
  if check:
    assert result.returncode == 0, result.stderr[-3000:]
  return result


def expected_scores(root, params, score):
  """Per latent, image scores and maps from float64 numpy over the base-grid rows."""
  from sae_jax.store import Store
  store = Store(root / "store")
  meta = store.meta()
  base = np.flatnonzero(meta["kind"] == KIND_IMAGE_BASE)
  x = np.stack([store[i] for i in base])
  values, indices = reference.encode_numpy(params, x, K)
  codes = np.zeros((len(base), N_LATENTS))
  np.put_along_axis(codes, indices, values, 1)
  images = meta["image_id"][base]
  num_images = images.max() + 1
  maps = np.zeros((num_images, GRID[0] * GRID[1], N_LATENTS))
  maps[images, meta["patch"][base]] = codes
  scores = maps.mean(1) if score == "mean" else maps.max(1)
  return scores, maps, (codes > 0).sum(0) / len(base)


@pytest.mark.parametrize("score", ["mean", "max"])
def test_scan_matches_numpy_reference(setup, tmp_path, score):
  root, params, export = setup
  scan(root, export, tmp_path, f"--score={score}")
  scores, maps, density = expected_scores(root, params, score)
  top_images, top_scores = np.load(tmp_path / "top_images.npy"), np.load(tmp_path / "top_scores.npy")
  top_maps = np.load(tmp_path / "top_maps.npy")
  for latent in range(N_LATENTS):
    firing = np.flatnonzero(scores[:, latent] > 0)
    expected = firing[np.argsort(-scores[firing, latent], kind="stable")][:4]
    got = top_images[latent][top_images[latent] >= 0]
    np.testing.assert_allclose(top_scores[latent, :len(got)], scores[got, latent], rtol=1e-4)
    np.testing.assert_allclose(np.sort(scores[got, latent]), np.sort(scores[expected, latent]),
                               rtol=1e-4)
    np.testing.assert_allclose(top_maps[latent, :len(got)], maps[got, :, latent], rtol=2e-3,
                               atol=1e-3)
  np.testing.assert_allclose(np.load(tmp_path / "density.npy"), density, rtol=1e-6)
  meta = json.loads((tmp_path / "topacts.json").read_text())
  assert meta["complete"] and meta["grid"] == list(GRID) and meta["images_scanned"] == 21
  assert np.load(tmp_path / "histogram.npy").sum() == round(density.sum() * 21 * 6)


def test_scan_resumes_after_kill(setup, tmp_path):
  root, _, export = setup
  scan(root, export, tmp_path / "straight")
  killed = scan(root, export, tmp_path / "resumed", "--save_every=2", "--debug_kill_after_saves=2",
                check=False)
  assert killed.returncode == -9
  assert not json.loads((tmp_path / "resumed" / "topacts.json").read_text())["complete"]
  scan(root, export, tmp_path / "resumed", "--save_every=2")
  for name in ("top_images.npy", "top_scores.npy", "top_maps.npy", "density.npy",
               "histogram.npy"):
    np.testing.assert_array_equal(np.load(tmp_path / "straight" / name),
                                  np.load(tmp_path / "resumed" / name), err_msg=name)
