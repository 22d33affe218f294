"""The latent scan against a float64 numpy reference, and its resume after a kill at any write."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import reference

from sae_jax import scan as scan_lib
from sae_jax.formats import dictionary
from sae_jax.store import KIND_IMAGE_BASE, KIND_TEXT, META_DTYPE, StoreWriter
from sae_jax.formats.topacts import TopActs, TopActsError

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


def topk_codes(params, x):
  values, indices = reference.encode_numpy(params, x, K)
  codes = np.zeros((len(x), N_LATENTS))
  np.put_along_axis(codes, indices, values, 1)
  return codes


def expected_scores(root, params, score, codes_of=topk_codes):
  """Per latent, image scores and maps from float64 numpy over the base-grid rows, whose dense
  codes [rows, n] are `codes_of(params, x)`."""
  from sae_jax.store import Store
  store = Store(root / "store")
  meta = store.meta()
  base = np.flatnonzero(meta["kind"] == KIND_IMAGE_BASE)
  codes = codes_of(params, np.stack([store[i] for i in base]))
  images = meta["image_id"][base]
  num_images = images.max() + 1
  maps = np.zeros((num_images, GRID[0] * GRID[1], N_LATENTS))
  maps[images, meta["patch"][base]] = codes
  scores = maps.mean(1) if score == "mean" else maps.max(1)
  return scores, maps, (codes > 0).sum(0) / len(base)


def assert_top_images(out, scores, density) -> np.ndarray:
  """The scan in `out` holds each latent's top 4 images by `scores` (ties in any order) and the
  density; returns its top images."""
  top_images, top_scores = np.load(out / "top_images.npy"), np.load(out / "top_scores.npy")
  for latent in range(N_LATENTS):
    firing = np.flatnonzero(scores[:, latent] > 0)
    expected = firing[np.argsort(-scores[firing, latent], kind="stable")][:4]
    got = top_images[latent][top_images[latent] >= 0]
    np.testing.assert_allclose(top_scores[latent, :len(got)], scores[got, latent], rtol=1e-4)
    np.testing.assert_allclose(np.sort(scores[got, latent]), np.sort(scores[expected, latent]),
                               rtol=1e-4)
  np.testing.assert_allclose(np.load(out / "density.npy"), density, rtol=1e-6)
  return top_images


@pytest.mark.parametrize("score", ["mean", "max"])
def test_scan_matches_numpy_reference(setup, tmp_path, score):
  root, params, export = setup
  scan(root, export, tmp_path, f"--score={score}")
  scores, maps, density = expected_scores(root, params, score)
  top_images = assert_top_images(tmp_path, scores, density)
  top_maps = np.load(tmp_path / "top_maps.npy")
  for latent in range(N_LATENTS):
    got = top_images[latent][top_images[latent] >= 0]
    np.testing.assert_allclose(top_maps[latent, :len(got)], maps[got, :, latent], rtol=2e-3,
                               atol=1e-3)
  meta = json.loads((tmp_path / "topacts.json").read_text())
  assert meta["complete"] and meta["grid"] == list(GRID) and meta["images_scanned"] == 21
  assert np.load(tmp_path / "histogram.npy").sum() == round(density.sum() * 21 * 6)


# Runs `python -m sae_jax.scan ARGS...` and kill -9s it right after it renames its KILL_AT-th file
# into OUT (every file the scan writes is written to a temporary name and renamed).
KILL_AFTER_WRITES = """
import os, runpy, signal, sys
from pathlib import Path
out, kill_at = Path(sys.argv[1]), int(sys.argv[2])
real_replace, written = os.replace, []
def replace(src, dst):
  real_replace(src, dst)
  if Path(dst).parent == out:
    written.append(dst)
    if len(written) == kill_at:
      os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
sys.argv = [sys.argv[0], *sys.argv[3:]]
runpy.run_module("sae_jax.scan", run_name="__main__", alter_sys=True)
"""


class Killed(BaseException):
  """Stands in for kill -9: a BaseException, so nothing on its way out handles it."""


def count_writes(out, monkeypatch, kill_at=None):
  """The files renamed into `out`, in order; raises Killed right after the `kill_at`-th."""
  real_replace, written = os.replace, []

  def replace(src, dst):
    real_replace(src, dst)
    if Path(dst).parent == out:
      written.append(Path(dst).name)
      if len(written) == kill_at:
        raise Killed(f"after writing {written}")
  monkeypatch.setattr(os, "replace", replace)
  return written


def in_process_scan(root, export, out):
  return scan_lib.scan(str(export), str(root / "store"), str(out), top_n=4, chunk_images=2,
                       save_every=2, progress=False)


def assert_same_scan(expected, got):
  for name in ("top_images", "top_scores", "top_maps", "density", "histogram",
               "modality_mass", "top_text_rows", "top_text_values", "top_text_images",
               "top_text_positions"):
    np.testing.assert_array_equal(np.load(expected / f"{name}.npy"), np.load(got / f"{name}.npy"),
                                  err_msg=name)
  for name in ("images.jsonl", "topacts.json"):
    assert (expected / name).read_text() == (got / name).read_text(), name
  for top in np.load(got / "top_images.npy"):  # the symptom of a torn state: an image twice
    assert len(set(top[top >= 0])) == np.sum(top >= 0), top
  assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in expected.iterdir())


def test_a_kill_after_any_write_resumes_to_the_same_scan(setup, tmp_path, monkeypatch):
  root, _, export = setup
  straight = tmp_path / "straight"
  writes = count_writes(straight, monkeypatch)
  in_process_scan(root, export, straight)
  assert writes.count(scan_lib.STATE) == 6  # 3 shards x 4 chunks (of 2, 2, 2, 1 images) / 2
  assert writes[-1] == "topacts.json"
  for kill_at in range(1, len(writes) + 1):
    out = tmp_path / f"killed_{kill_at}"
    count_writes(out, monkeypatch, kill_at)
    with pytest.raises(Killed):
      in_process_scan(root, export, out)
    if kill_at < len(writes):
      with pytest.raises(TopActsError, match="is not a finished TOPACTS folder"):
        TopActs(out)
    count_writes(out, monkeypatch)
    in_process_scan(root, export, out)
    assert_same_scan(straight, out)


def test_kill_9_of_the_command_resumes_to_the_same_scan(setup, tmp_path):
  root, _, export = setup
  in_process_scan(root, export, tmp_path / "straight")
  out = tmp_path / "resumed"
  args = [f"--sae={export}", f"--store={root / 'store'}", f"--out={out}", "--top_n=4",
          "--chunk_images=2", "--save_every=2"]
  # The 9th file: after the 6 state saves, inside the output (which a state of several files
  # per save would have reached inside its second save).
  killed = subprocess.run([sys.executable, "-c", KILL_AFTER_WRITES, str(out), "9", *args],
                          capture_output=True, text=True, timeout=300)
  assert killed.returncode == -9, killed.stderr[-3000:]
  assert (out / scan_lib.STATE).exists() and not (out / "topacts.json").exists()
  resumed = subprocess.run([sys.executable, "-m", "sae_jax.scan", *args], capture_output=True,
                           text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert_same_scan(tmp_path / "straight", out)


def test_unfinished_scan_of_an_older_version_is_refused(setup, tmp_path):
  root, _, export = setup
  in_process_scan(root, export, tmp_path)
  header = json.loads((tmp_path / "topacts.json").read_text())
  (tmp_path / "topacts.json").write_text(json.dumps({**header, "complete": False}))
  with pytest.raises(TopActsError, match=r"topacts.json: the scan has not finished"):
    TopActs(tmp_path)
  with pytest.raises(scan_lib.ScanError, match=r"unfinished scan of an older sae_jax.scan"):
    in_process_scan(root, export, tmp_path)


def test_jumprelu_scan_matches_numpy_reference_and_counts_rows_over_the_cap(setup, tmp_path):
  """Per-latent thresholds (Gemma Scope style), at most --max_active latents per row: the largest
  above threshold; the rows that had more are counted."""
  from sae_jax.store import Store
  root, params, _ = setup
  cap = 5
  params = {**params, "threshold": np.random.default_rng(1).uniform(1.5, 4.0, N_LATENTS)}
  export = dictionary.write(tmp_path / "export", "model.layers.0", params, k=None, layout="saelens")

  def capped_jumprelu(params, x):
    z, _ = reference.jumprelu_numpy(params, x)
    dropped = np.argsort(-z, axis=1, kind="stable")[:, cap:]
    np.put_along_axis(z, dropped, 0.0, 1)
    return z

  with pytest.raises(scan_lib.ScanError, match="without our sidecar: give --max_active"):
    scan_lib.scan(str(export), str(root / "store"), str(tmp_path / "refused"), progress=False)
  out = tmp_path / "topacts"
  summary = scan_lib.scan(str(export), str(root / "store"), str(out), top_n=4, chunk_images=2,
                          max_active=cap, progress=False)
  scores, maps, density = expected_scores(root, params, "mean", capped_jumprelu)
  assert_top_images(out, scores, density)

  store = Store(root / "store")
  z, _ = reference.jumprelu_numpy(params, np.stack([store[i] for i in range(len(store.meta()))]))
  over = int(((z > 0).sum(1) > cap).sum())  # base-grid and text rows alike
  assert 0 < over < len(z) / 2  # the cap cuts some rows, not most
  header = json.loads((out / "topacts.json").read_text())
  assert summary["rows_over_cap"] == header["rows_over_cap"] == over
  assert header["max_active"] == cap and header["architecture"] == "jumprelu"

  topk_export = setup[2]
  with pytest.raises(scan_lib.ScanError, match="--max_active=5 applies to JumpReLU"):
    scan_lib.scan(str(topk_export), str(root / "store"), str(tmp_path / "x"), max_active=cap,
                  progress=False)
