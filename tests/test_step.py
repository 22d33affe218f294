"""The whole training update against a float64 numpy reference, and the step's plumbing."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sae_jax.training import step as step_lib
from sae_jax.kernels.kernel_plan import KernelPlan
from sae_jax.config import SAEConfig

D, N, K, B = 10, 40, 3, 16
LR, B1, B2, EPS = 1e-2, 0.9, 0.99, 1e-4  # eps large enough that Adam is not sign(g) at step 1


def reference_losses_and_grads(p, x, cfg: SAEConfig, dead):
  """Loss and hand-derived gradients of FVU + Multi-TopK + AuxK, float64."""
  W_enc, b_enc, W_dec, b_dec = p["W_enc"], p["b_enc"], p["W_dec"], p["b_dec"]
  xc = x - b_dec
  pre = np.maximum(xc @ W_enc.T + b_enc, 0)
  # Free decoder norms rank by pre-activation x row norm and decode pre-activation x raw row.
  norms = np.linalg.norm(W_dec, axis=1) if cfg.decoder_norm == "free" else np.ones(len(W_dec))
  rows = np.arange(len(x))[:, None]
  g = {name: np.zeros_like(value) for name, value in p.items()}

  def code(scores, k):
    idx = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    z = np.zeros_like(pre)
    z[rows, idx] = pre[rows, idx]
    return z

  def backprop(z, g_recon):  # g_recon = dL/d(z @ W_dec)
    g["W_dec"] += z.T @ g_recon
    g_pre = (g_recon @ W_dec.T) * (z > 0)
    g["W_enc"] += g_pre.T @ xc
    g["b_enc"] += g_pre.sum(0)
    g["b_dec"] -= (g_pre @ W_enc).sum(0)

  total_variance = np.sum((x - x.mean(0)) ** 2)
  z = code(pre * norms, cfg.k)
  x_hat = z @ W_dec + b_dec
  loss = np.sum((x_hat - x) ** 2) / total_variance
  backprop(z, 2 * (x_hat - x) / total_variance)
  g["b_dec"] += (2 * (x_hat - x) / total_variance).sum(0)
  if cfg.multi_topk:
    z4 = code(pre * norms, 4 * cfg.k)
    r4 = z4 @ W_dec + b_dec - x
    loss += np.sum(r4 ** 2) / total_variance / 8
    backprop(z4, 2 * r4 / total_variance / 8)
    g["b_dec"] += (2 * r4 / total_variance / 8).sum(0)
  num_dead = dead.sum()
  if cfg.num_aux and num_dead:
    z_aux = code(np.where(dead, pre * norms, -1.0), cfg.num_aux) * dead
    residual = x - x_hat
    e_hat = z_aux @ W_dec
    coef = cfg.auxk_alpha * min(num_dead / cfg.num_aux, 1.0)
    loss += coef * np.sum((e_hat - residual) ** 2) / total_variance
    backprop(z_aux, coef * 2 * (e_hat - residual) / total_variance)
  return loss, g, z


def reference_update(p, mu, nu, t, count, x, cfg):
  """One step: grads, decoder-parallel projection, Adam, row renorm (the two with unit rows),
  dead counter."""
  dead = count > cfg.dead_tokens
  loss, g, z = reference_losses_and_grads(p, x, cfg, dead)
  unit = cfg.decoder_norm == "unit"
  W = p["W_dec"]
  if unit:
    g["W_dec"] = g["W_dec"] - np.sum(g["W_dec"] * W, axis=1, keepdims=True) * W
  new = {}
  for name in p:
    mu[name] = B1 * mu[name] + (1 - B1) * g[name]
    nu[name] = B2 * nu[name] + (1 - B2) * g[name] ** 2
    m_hat, v_hat = mu[name] / (1 - B1 ** t), nu[name] / (1 - B2 ** t)
    new[name] = p[name] - LR * m_hat / (np.sqrt(v_hat) + EPS)
  if unit:
    new["W_dec"] /= np.linalg.norm(new["W_dec"], axis=1, keepdims=True)
  count = np.where((z > 0).any(0), 0, count + len(x))
  return loss, g, new, count


@pytest.mark.parametrize("multi_topk,weight_grads,decoder_norm", [
    (False, "scatter", "unit"), (True, "scatter", "unit"), (True, "xla_scatter", "unit"),
    (True, "matmul", "unit"), (True, "scatter", "free"), (True, "xla_scatter", "free"),
    (True, "matmul", "free")])
def test_train_step_matches_float64_reference(multi_topk, weight_grads, decoder_norm):
  plan = None
  if weight_grads == "xla_scatter":  # a CPU host without the native kernels
    plan, weight_grads = KernelPlan.for_platform("cpu", use_native=False), "scatter"
  cfg = SAEConfig(d_in=D, num_latents=N, k=K, multi_topk=multi_topk, auxk_alpha=0.25, k_aux=4,
                  dead_tokens=2 * B, weight_grads=weight_grads, decoder_norm=decoder_norm)
  rng = np.random.default_rng(0)
  tx = step_lib.make_optimizer(LR, b1=B1, b2=B2, eps=EPS)
  graphdef, state = step_lib.create_state(cfg, tx, seed=0, b_dec=rng.normal(0, 0.2, D), plan=plan)
  model, optimizer = nnx.merge(graphdef, state)
  model.b_enc[...] = jnp.asarray(rng.normal(0, 0.05, N), jnp.float32)
  # Some latents start dead, one is one batch short of dying.
  count = np.zeros(N, np.int32)
  count[:6] = 10 * B
  count[6] = B + 1
  model.tokens_since_fired[...] = jnp.asarray(count)
  if decoder_norm == "free":  # norms far enough apart that ranking by them changes the picks
    model.W_dec[...] *= jnp.asarray(rng.uniform(0.3, 3.0, (N, 1)), jnp.float32)
  graphdef, state = nnx.split((model, optimizer))

  p = {name: np.asarray(getattr(model, name)[...], np.float64)
       for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
  if decoder_norm == "free":
    x = rng.normal(0.3, 1.0, (B, D))
    pre = np.maximum((x - p["b_dec"]) @ p["W_enc"].T + p["b_enc"], 0)
    by_value = np.sort(np.argsort(-pre, axis=1)[:, :K], axis=1)
    by_norm = np.sort(np.argsort(-pre * np.linalg.norm(p["W_dec"], axis=1), axis=1)[:, :K], axis=1)
    assert (by_value != by_norm).any(axis=1).mean() > 0.5
  mu = {name: np.zeros_like(v) for name, v in p.items()}
  nu = {name: np.zeros_like(v) for name, v in p.items()}
  step = jax.jit(step_lib.train_step, donate_argnums=1)
  for t in (1, 2, 3):
    x = rng.normal(0.3, 1.0, (B, D)).astype(np.float32)
    state, metrics = step(graphdef, state, jnp.asarray(x))
    loss, g, p, count = reference_update(p, mu, nu, t, count, x.astype(np.float64), cfg)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"],
                               np.sqrt(sum(np.sum(v ** 2) for v in g.values())), rtol=1e-5)
    model, _ = nnx.merge(graphdef, state)
    for name in p:
      np.testing.assert_allclose(getattr(model, name)[...], p[name], rtol=1e-4, atol=1e-6,
                                 err_msg=f"step {t} {name}")
    np.testing.assert_array_equal(model.tokens_since_fired[...], count)
  assert metrics["auxk_loss"] > 0 and metrics["dead_fraction"] > 0


def test_metrics_and_eval():
  cfg = SAEConfig(d_in=D, num_latents=N, k=K)
  graphdef, state = step_lib.create_state(cfg, step_lib.make_optimizer(1e-3), seed=1, b_dec=None)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(B, D)), jnp.float32)
  evaluated = step_lib.eval_metrics(graphdef, state, x)
  new_state, metrics = jax.jit(step_lib.train_step)(graphdef, state, x)
  assert set(metrics) == {"loss", "fvu", "mse", "auxk_loss", "multi_topk_fvu", "dead_fraction",
                          "grad_norm", "l0"}
  assert all(v.shape == () and v.dtype == jnp.float32 for v in metrics.values())
  for name in ("fvu", "mse", "l0"):
    np.testing.assert_allclose(evaluated[name], metrics[name], rtol=1e-6)
  assert metrics["l0"] == K and metrics["auxk_loss"] == 0 and metrics["dead_fraction"] == 0
  model, optimizer = nnx.merge(graphdef, new_state)
  assert int(optimizer.step[...]) == 1
  np.testing.assert_array_equal(model.tokens_since_fired[...] > 0,
                                np.asarray(model.tokens_since_fired[...]) == B)


@pytest.mark.parametrize("decoder_norm", ["free", "unit"])
def test_a_state_built_outside_jit_can_be_donated(decoder_norm):
  """Free rows start equal to the encoder's: as two buffers, or donating the state fails (as
  sae_jax.bench does with a state built eagerly)."""
  cfg = SAEConfig(d_in=D, num_latents=N, k=K, decoder_norm=decoder_norm)
  graphdef, state = step_lib.create_state(cfg, step_lib.make_optimizer(1e-3), seed=0)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(B, D)), jnp.float32)
  state, metrics = jax.jit(step_lib.train_step, static_argnums=0, donate_argnums=1)(
      graphdef, state, x)
  assert np.isfinite(float(metrics["loss"]))


def test_create_state_is_traceable_and_clipping_applies():
  cfg = SAEConfig(d_in=D, num_latents=N, k=K)
  tx = step_lib.make_optimizer(step_lib.default_learning_rate(N), grad_clip=1e-3)
  graphdef, _ = step_lib.create_state(cfg, tx, seed=0, b_dec=None)
  b_dec = jnp.arange(D, dtype=jnp.float32)
  state = jax.jit(lambda b: step_lib.create_state(cfg, tx, seed=0, b_dec=b)[1])(b_dec)
  model, _ = nnx.merge(graphdef, state)
  np.testing.assert_array_equal(model.b_dec[...], b_dec)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(B, D)), jnp.float32)
  _, metrics = jax.jit(step_lib.train_step)(graphdef, state, x)
  assert metrics["grad_norm"] > 1e-3  # reported before clipping
  assert step_lib.default_learning_rate(2**14) == 2e-4
  assert step_lib.default_learning_rate(2**16) == pytest.approx(1e-4)


MESH_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
from sae_jax.kernels import sharding
from sae_jax.training import step as step_lib
from sae_jax.config import SAEConfig
# AuxK's exact selection, as on one device (per_shard is tested in tests/test_auxk_select.py).
cfg = SAEConfig(d_in=16, num_latents=64, k=4, multi_topk=True, dead_tokens=40, k_aux=6,
                auxk_select="exact")
tx = step_lib.make_optimizer(1e-2)
x = jnp.asarray(np.random.default_rng(0).normal(size=(32, 16)), jnp.float32)
init = lambda: step_lib.create_state(cfg, tx, seed=0, b_dec=None)
graphdef, want = init()
one_device = jax.jit(step_lib.train_step)
mesh = sharding.make_mesh("data:2,model:2")
with jax.set_mesh(mesh):
  shardings = sharding.state_shardings(jax.eval_shape(lambda: init()[1]), mesh)
  got = jax.jit(lambda: init()[1], out_shardings=shardings)()
  on_mesh = jax.jit(lambda s, x: step_lib.train_step(graphdef, s, x), donate_argnums=0,
                    in_shardings=(shardings, sharding.batch_sharding(mesh)),
                    out_shardings=(shardings, None))
  for _ in range(3):  # the third step has dead latents, so AuxK runs
    want, want_metrics = one_device(graphdef, want, x)
    got, got_metrics = on_mesh(got, x)
assert float(got_metrics["auxk_loss"]) > 0
for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
assert got[0]["W_enc"][...].sharding.spec == jax.sharding.PartitionSpec("model", None)
print("ok")
"""


def test_train_step_on_a_data_model_mesh_matches_one_device():
  """The step under the trainer's shardings (4 fake CPU devices, in a fresh process)."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, "-c", MESH_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_shardings_come_from_the_variables_metadata_even_when_n_equals_d():
  """With n == d, b_dec and b_enc have the same shape; only the per-latent one (and its Adam
  moments) is split over "model"."""
  from jax.sharding import PartitionSpec as P

  from sae_jax.kernels import sharding
  cfg = SAEConfig(d_in=32, num_latents=32, k=4)
  tx = step_lib.make_optimizer(1e-3)
  abstract = jax.eval_shape(lambda: step_lib.create_state(cfg, tx, seed=0)[1])
  mesh = sharding.make_mesh("data:1,model:1", jax.devices()[:1])
  specs = {jax.tree_util.keystr(path): s.spec for path, s in
           jax.tree.leaves_with_path(sharding.state_shardings(abstract, mesh))}
  latent = [k for k in specs if any(n in k for n in ("W_enc", "W_dec", "b_enc",
                                                     "tokens_since_fired"))]
  assert len(latent) == 3 + 3 * 2 + 1  # W_enc, W_dec, b_enc, two Adam moments each, the counter
  for key, spec in specs.items():
    want = (P("model", None) if "'W_" in key else P("model")) if key in latent else P()
    assert spec == want, key
