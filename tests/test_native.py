"""sae_jax.kernels.native's CPU kernels against float64 numpy, and how the library gets built."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from sae_jax.kernels import native
from sae_jax.training import step as step_lib
from sae_jax.kernels.kernel_plan import KernelPlan
from sae_jax.config import SAEConfig

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu" or not native.available(),
                                reason="the kernels are CPU-only; or no C++ compiler on this host")

# Odd sizes exercise the kernels' remainder loops (4 rows per pass, SIMD lanes).
B, K, N, D = 37, 7, 29, 19


def picks(seed=0, out_of_range=False):
  rng = np.random.default_rng(seed)
  indices = rng.integers(0, N, (B, K)).astype(np.int32)  # with repeats within a token
  weights = rng.normal(size=(B, K)).astype(np.float32)
  weights[rng.random((B, K)) < 0.2] = 0.0  # zero weights are skipped
  if out_of_range:
    indices[0, 0], indices[1, 1] = -1, N  # skipped too
  return indices, weights, rng.normal(size=(B, D)).astype(np.float32)


def in_range(indices):
  return (indices >= 0) & (indices < N)


@pytest.mark.parametrize("table_dtype", [np.float32, ml_dtypes.bfloat16])
def test_gather_weighted_sum(table_dtype):
  indices, weights, _ = picks(out_of_range=True)
  table = np.random.default_rng(1).normal(size=(N, D)).astype(table_dtype)
  got = jax.jit(native.gather_weighted_sum)(weights, indices, table)
  rows = table.astype(np.float64)[np.clip(indices, 0, N - 1)]
  want = np.einsum("bk,bkd->bd", weights * in_range(indices), rows)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_row_grads_and_the_table_sum():
  indices, weights, rows = picks(out_of_range=True)
  sum_table = np.random.default_rng(2).normal(size=(N, D)).astype(np.float32)
  grad, sums, table_sum = jax.jit(native.row_grads, static_argnums=3)(
      indices, weights, rows, N, sum_table)
  want_grad, want_sums = np.zeros((N, D)), np.zeros(N)
  for b, j in zip(*np.nonzero(in_range(indices))):
    want_grad[indices[b, j]] += weights[b, j] * rows[b].astype(np.float64)
    want_sums[indices[b, j]] += weights[b, j]
  np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(sums, want_sums, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(table_sum, want_sums @ sum_table, rtol=1e-5, atol=1e-5)
  assert native.row_grads(indices, weights, rows, N)[2] is None


@pytest.mark.parametrize("table_dtype", [np.float32, ml_dtypes.bfloat16])
def test_row_grads_and_dots(table_dtype):
  indices, weights, rows = picks(seed=3)
  table = np.random.default_rng(4).normal(size=(N, D)).astype(table_dtype)
  grad, sums, dots = jax.jit(native.row_grads_and_dots)(indices, weights, rows, table)
  want_grad = np.zeros((N, D))
  np.add.at(want_grad, indices, weights[..., None] * rows[:, None, :].astype(np.float64))
  want_dots = np.einsum("bd,bkd->bk", rows, table.astype(np.float64)[indices])
  np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dots, want_dots, rtol=1e-5, atol=1e-5)  # zero weights too
  np.testing.assert_allclose(sums, np.bincount(indices.ravel(), weights.ravel(), N), atol=1e-5)


def test_row_dots_and_normalize_rows():
  rng = np.random.default_rng(5)
  a, b = rng.normal(size=(2, N, D)).astype(np.float32)
  a[3] = 0.0  # a zero row stays zero (divided by eps, not by its norm)
  np.testing.assert_allclose(jax.jit(native.row_dots)(a, b), np.sum(a * b.astype(np.float64), 1),
                             rtol=1e-5, atol=1e-6)
  norms = np.linalg.norm(a.astype(np.float64), axis=1, keepdims=True)
  np.testing.assert_allclose(jax.jit(native.normalize_rows, static_argnums=1)(a, 1e-12),
                             a / np.maximum(norms, 1e-12), rtol=1e-5, atol=1e-6)


def test_results_do_not_depend_on_the_run():
  indices, weights, rows = picks(seed=6)
  run = jax.jit(native.row_grads, static_argnums=3)
  first, again = run(indices, weights, rows, N, rows[:N]), run(indices, weights, rows, N, rows[:N])
  for got, want in zip(first, again):
    np.testing.assert_array_equal(got, want)


def step_hlo(plan, decoder_norm: str = "free") -> str:
  cfg = SAEConfig(d_in=8, num_latents=32, k=2, decoder_norm=decoder_norm)
  graphdef, state = step_lib.create_state(cfg, step_lib.make_optimizer(1e-3), seed=0, plan=plan)
  return jax.jit(step_lib.train_step).lower(graphdef, state, jnp.zeros((4, 8))).as_text()


def test_the_cpu_plan_uses_the_kernels_unless_told_not_to():
  native_plan = KernelPlan.for_devices(jax.devices("cpu"))
  assert native_plan.native
  assert "sae_row_grads_and_dots" in step_hlo(native_plan)
  assert "sae_row_dots" in step_hlo(native_plan)  # the free decoder norms
  assert "sae_normalize_rows" in step_hlo(native_plan, "unit")  # the renorm of unit rows
  assert "sae_normalize_rows" not in step_hlo(native_plan)
  for decoder_norm in ("free", "unit"):
    assert "sae_" not in step_hlo(KernelPlan.for_platform("cpu", use_native=False), decoder_norm)


def run_python(code: str, **env) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        env={**os.environ, **env}, check=True)


def test_switched_off_by_the_environment():
  check = "from sae_jax.kernels import native; print(native.available())"
  assert run_python(check, SAE_JAX_NATIVE="0").stdout.strip() == "False"


def test_a_failed_build_warns_and_falls_back(tmp_path):
  check = "from sae_jax.kernels import native; print(native.available())"
  result = run_python(check, CXX="false", SAE_JAX_CACHE=str(tmp_path))
  assert result.stdout.strip() == "False"
  assert "CPU kernels unavailable" in result.stderr and "false -O3" in result.stderr
  assert not list(tmp_path.glob("*.so"))
