"""End to end: a tiny BatchTopK training run exports as a JumpReLU (SAELens layout) that the torch
SAE runs exactly as the JAX model's inference encode; the exports it cannot make are refused."""

import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import synthetic

from interpret.sae import SAE
from sae_jax.formats import dictionary
from sae_jax.training import checkpoint
from sae_jax.architectures import batchtopk
from sae_jax.store import Store

START = 6  # the threshold is learned from optimizer step 6: checkpoint 5 has none, 10 has one


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  store = synthetic.write_sparse_store(tmp_path_factory.mktemp("store"), num_shards=2)
  workdir = tmp_path_factory.mktemp("run")
  cmd = [sys.executable, "-m", "sae_jax.train", f"--store={store}", f"--workdir={workdir}",
         "--num_latents=64", "--k=4", "--batch_size=64", "--steps=10", "--checkpoint_every=5",
         "--log_every=5", "--lr_warmup_steps=2", "--normalize_inputs", "--architecture=batchtopk",
         f"--threshold_start_step={START}", "--threshold_beta=0.5", "--matryoshka_prefixes=16"]
  result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stdout[-1000:] + result.stderr[-3000:]
  return workdir, store


def export(workdir, out, *flags):
  return subprocess.run([sys.executable, "-m", "sae_jax.export", f"--workdir={workdir}",
                         f"--out={out}", *flags], capture_output=True, text=True, timeout=300)


def error_of(result) -> str:
  assert result.returncode == 1, result.stderr[-3000:]
  [line] = result.stdout.splitlines()
  return json.loads(line)["error"]


def test_the_torch_sae_runs_the_export_as_the_jax_model_encodes(workdir, tmp_path):
  workdir, store = workdir
  result = export(workdir, tmp_path, "--format=saelens")
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads(result.stdout.splitlines()[-1])
  assert summary["architecture"] == "jumprelu" and summary["step"] == 10
  sidecar = json.loads((tmp_path / "model.layers.3" / "sae_jax.json").read_text())
  assert sidecar["sae"]["architecture"] == "batchtopk" and sidecar["sae"]["k"] == 4
  assert sidecar["sae"]["matryoshka_prefixes"] == [16] and "batchtopk_max_k" in sidecar["sae"]

  model, run, _ = checkpoint.load_model(workdir)
  threshold, scale = float(model.threshold[...]), run["input_scale"]
  assert threshold > 0
  data = Store(store)
  x = np.stack([data[i] for i in range(256)]).astype(np.float32)
  z_jax = np.asarray(batchtopk.jumprelu_code(model, jnp.asarray(scale * x)), np.float64) / scale
  x_hat_jax = np.asarray(model(jnp.asarray(scale * x))) / scale  # the model sees scale * x

  sae = SAE.from_export(tmp_path)
  np.testing.assert_array_equal(sae.threshold.numpy(), np.float32(threshold) / np.float32(scale))
  t_values, t_indices = sae.encode(torch.from_numpy(x))
  z_torch = np.zeros_like(z_jax)
  np.put_along_axis(z_torch, t_indices.numpy(), t_values.double().numpy(), 1)
  active = (z_jax > 0).sum(1)
  assert 0 < active.mean() < 64
  # One rule, no cap on either side: the same latents, the same values, the same reconstruction.
  np.testing.assert_array_equal(z_torch > 0, z_jax > 0)
  np.testing.assert_allclose(z_torch, z_jax, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(sae.decode(t_values, t_indices).numpy(), x_hat_jax,
                             rtol=1e-4, atol=1e-5)


def test_exports_the_run_cannot_make_are_refused(workdir, tmp_path):
  workdir, _ = workdir
  early = error_of(export(workdir, tmp_path / "early", "--format=saelens", "--step=5"))
  assert "step 5" in early and f"--threshold_start_step={START}" in early
  sparsify = error_of(export(workdir, tmp_path / "sparsify", "--format=sparsify"))
  assert "--format=sparsify" in sparsify and "--format=saelens" in sparsify
  assert not (tmp_path / "sparsify").exists() and not (tmp_path / "early").exists()


def train_from(init, workdir, store, *flags):
  cmd = [sys.executable, "-m", "sae_jax.train", f"--store={store}", f"--workdir={workdir}",
         f"--init_from={init}", "--k=4", "--batch_size=64", "--steps=1", "--b_dec_init=zeros",
         *flags]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_a_jumprelu_export_starts_a_batchtopk_run_with_its_threshold_or_a_topk_run_without(
    workdir, tmp_path):
  workdir, store = workdir
  exported = SAE.from_export(export_folder(workdir, tmp_path)).threshold.numpy()

  # Its threshold is not updated before optimizer step 1000, so step 1 holds the export's.
  result = train_from(tmp_path / "export", tmp_path / "batchtopk", store,
                      "--architecture=batchtopk", "--threshold_start_step=1000")
  assert result.returncode == 0, result.stderr[-3000:]
  model, _, _ = checkpoint.load_model(tmp_path / "batchtopk")
  assert float(model.threshold[...]) == exported[0]

  result = train_from(tmp_path / "export", tmp_path / "topk", store)
  assert result.returncode == 0, result.stderr[-3000:]
  model, _, _ = checkpoint.load_model(tmp_path / "topk")
  assert not hasattr(model, "threshold")


def test_per_latent_thresholds_cannot_start_a_batchtopk_run(workdir, tmp_path):
  workdir, store = workdir
  params, _ = dictionary.read(export_folder(workdir, tmp_path))
  params["threshold"] = np.linspace(0.1, 0.2, len(params["b_enc"]), dtype=np.float32)
  dictionary.write(tmp_path / "gemma_like", "model.layers.3", params, k=None, layout="saelens")
  error = error_of(train_from(tmp_path / "gemma_like", tmp_path / "run", store,
                              "--architecture=batchtopk"))
  assert "--init_from=" in error and "per-latent thresholds (0.1 to 0.2)" in error


def export_folder(workdir, tmp_path):
  assert export(workdir, tmp_path / "export", "--format=saelens").returncode == 0
  return tmp_path / "export"


def test_inference_metrics_are_logged_once_a_threshold_exists(workdir):
  """Step 5 (no threshold yet: a JumpReLU at -1 would keep every positive latent) logs training
  numbers only; step 10 adds the JumpReLU's FVU and L0, at most the latents that fired."""
  workdir, _ = workdir
  rows = {r["step"]: r for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())}
  assert rows[5]["threshold"] < 0 and "inference_fvu" not in rows[5]
  assert "inference_l0" not in rows[5] and "fvu" in rows[5]
  assert rows[10]["threshold"] > 0 and 0 < rows[10]["inference_l0"] < 64
  assert 0 < rows[10]["inference_fvu"] < 1
