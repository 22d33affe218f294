"""BatchTopK and Matryoshka against float64 references: the batch's cut and picks, the losses and
their gradients (against jax.grad of a dense formulation), and the inference threshold's EMA."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import reference

from sae_jax.architectures import batchtopk
from sae_jax.training import step as step_lib
from sae_jax.config import SAEConfig

D, N, K, B = 12, 48, 3, 16
PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


def test_kth_largest_is_the_sorted_entry():
  rng = np.random.default_rng(0)
  values = np.maximum(rng.normal(size=(B, 10)), 0).astype(np.float32)  # about half zeros
  values[0, :3] = values[1, 5]  # ties
  values[2, 0] = -0.0
  values[3, 1] = 3e38
  for count in (1, 2, 7, 40, 80, 90, values.size):
    want = np.sort(values.ravel())[-count]
    assert float(jax.jit(batchtopk.kth_largest, static_argnums=1)(values, count)) == want, count


def model_and_batch(cfg, seed=0):
  rng = np.random.default_rng(seed)
  graphdef, state = step_lib.create_state(cfg, step_lib.make_optimizer(1e-2), seed=seed,
                                          b_dec=rng.normal(0, 0.1, D))
  model, optimizer = nnx.merge(graphdef, state)
  model.b_enc[...] = jnp.asarray(rng.normal(0, 0.1, N), jnp.float32)
  x = rng.normal(0.2, 1.0, (B, D))
  x[:4] *= 4  # a few loud tokens hold many of the batch's largest values: some hit the cap
  return model, optimizer, jnp.asarray(x, jnp.float32)


def params_of(model):
  return {name: np.asarray(getattr(model, name)[...], np.float64) for name in PARAMS}


def values_numpy(p, x, cfg):
  """The latents' values in float64: pre-activations, times the decoder norms when free."""
  return reference.pre_numpy(p, x) * reference.decoder_norms_numpy(p, cfg.decoder_norm)


@pytest.mark.parametrize("cap", [0, 4, 16, N])
def test_batchtopk_picks_the_batch_largest_candidates(cap):
  cfg = SAEConfig(d_in=D, num_latents=N, k=K, architecture="batchtopk", batchtopk_max_k=cap)
  model, _, x = model_and_batch(cfg)
  values, indices, _, _ = model.select(x)
  kept, capped = jax.jit(batchtopk.select, static_argnums=1)(values, K)
  pre = values_numpy(params_of(model), x, cfg)
  mask, cut, want_capped = reference.batchtopk_mask_numpy(pre, K, cfg.num_selected)
  got = np.zeros((B, N), bool)
  np.put_along_axis(got, np.asarray(indices), np.asarray(kept) > 0, 1)
  np.testing.assert_array_equal(got, mask & (pre > 0))
  assert got.sum() == B * K  # no ties, no zeros at the cut
  np.testing.assert_allclose(batchtopk.kth_largest(values, B * K), cut, rtol=1e-5)
  assert float(capped) == want_capped
  if cfg.num_selected == N:
    assert float(capped) == 0
  if float(capped) == 0:  # no token's last candidate kept: the cut of the whole flattened batch
    np.testing.assert_array_equal(got.ravel(), pre.ravel() >= np.sort(pre.ravel())[-B * K])
  if cap == 4:
    assert want_capped > 0  # the test exercises the cap
  if cap == 16:
    assert float(capped) == 0  # ... and a cap below n that never binds


def dense_loss(p, x, mask, aux_mask, cfg, num_dead):
  """FVU averaged over the Matryoshka levels, plus AuxK on the full reconstruction, with the
  picks given as dense masks."""
  pre = jax.nn.relu((x - p["b_dec"]) @ p["W_enc"].T + p["b_enc"])
  # Free norms as SAELens writes them (gradients through the norms included): values pre * s,
  # decoded as values / s.
  norms = jnp.linalg.norm(p["W_dec"], axis=1) if cfg.decoder_norm == "free" else 1.0
  z = jnp.where(mask, pre * norms, 0.0) / norms
  total_variance = jnp.sum(jnp.square(x - x.mean(0)))
  widths = (*cfg.matryoshka_prefixes, cfg.num_latents)
  latents = jnp.arange(cfg.num_latents)
  fvus = [jnp.sum(jnp.square(jnp.where(latents < w, z, 0.0) @ p["W_dec"] + p["b_dec"] - x))
          / total_variance for w in widths]
  residual = jax.lax.stop_gradient(x - (z @ p["W_dec"] + p["b_dec"]))
  e_hat = (jnp.where(aux_mask, pre * norms, 0.0) / norms) @ p["W_dec"]
  aux = min(num_dead / cfg.num_aux, 1.0) * jnp.sum(jnp.square(e_hat - residual)) / total_variance
  return sum(fvus) / len(fvus) + cfg.auxk_alpha * aux, fvus


@pytest.mark.parametrize("decoder_norm", ["free", "unit"])
@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_matryoshka_loss_and_gradients_match_a_dense_float64_formulation(architecture,
                                                                         decoder_norm):
  cfg = SAEConfig(d_in=D, num_latents=N, k=K, architecture=architecture, batchtopk_max_k=5,
                  matryoshka_prefixes=(9, 21), auxk_alpha=0.25, k_aux=4, dead_tokens=10,
                  decoder_norm=decoder_norm)
  model, optimizer, x = model_and_batch(cfg, seed=1)
  dead = np.zeros(N, bool)
  dead[np.random.default_rng(2).permutation(N)[:8]] = True
  model.tokens_since_fired[...] = jnp.asarray(np.where(dead, 100, 0), jnp.int32)
  if decoder_norm == "free":  # norms that change the picks, and the levels' first latents win
    scale = np.random.default_rng(3).uniform(0.5, 2.0, (N, 1))
    scale[list(cfg.matryoshka_prefixes)] = 4.0
    model.W_dec[...] *= jnp.asarray(scale, jnp.float32)
  graphdef, state = nnx.split((model, optimizer))

  def loss(params):
    model, _ = nnx.merge(graphdef, state, copy=True)
    nnx.update(model, params)
    return step_lib.losses(model, x, model.dead_mask())[:2]

  (got_loss, metrics), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
      nnx.state(model, nnx.Param))

  p = params_of(model)
  pre = values_numpy(p, x, cfg)
  if architecture == "batchtopk":
    mask = reference.batchtopk_mask_numpy(pre, K, cfg.num_selected)[0]
  else:
    mask = np.zeros((B, N), bool)
    np.put_along_axis(mask, np.argsort(-pre, axis=1, kind="stable")[:, :K], True, 1)
  # Latents 9 and 21 are picked: each is the first latent of a level's outer group.
  assert mask[:, list(cfg.matryoshka_prefixes)].any(0).all()
  aux_mask = np.zeros((B, N), bool)
  aux_idx = np.argsort(-np.where(dead, pre, -1.0), axis=1, kind="stable")[:, :cfg.num_aux]
  np.put_along_axis(aux_mask, aux_idx, True, 1)
  aux_mask &= dead
  with jax.enable_x64(True):
    (want_loss, fvus), want_grads = jax.value_and_grad(dense_loss, has_aux=True)(
        jax.tree.map(jnp.asarray, p), jnp.asarray(x, jnp.float64), mask, aux_mask, cfg,
        int(dead.sum()))
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  np.testing.assert_allclose(metrics["fvu"], fvus[-1], rtol=1e-5)
  for width, fvu in zip(cfg.matryoshka_prefixes, fvus):
    np.testing.assert_allclose(metrics[f"fvu_prefix_{width}"], fvu, rtol=1e-5)
  assert fvus[0] > fvus[1] > fvus[2]  # the levels differ: the test checks each
  assert metrics["auxk_loss"] > 0
  for name in PARAMS:
    np.testing.assert_allclose(grads[name][...], want_grads[name], rtol=1e-4, atol=1e-6,
                               err_msg=name)


def test_threshold_ema_and_the_jumprelu_inference():
  """The threshold stays unset before threshold_start_step, starts at the batch's smallest kept
  value, then follows the EMA; eval_metrics keeps every latent above it (no cap)."""
  beta, start = 0.8, 2
  cfg = SAEConfig(d_in=D, num_latents=N, k=K, architecture="batchtopk", threshold_beta=beta,
                  threshold_start_step=start, auxk_alpha=0)
  model, optimizer, _ = model_and_batch(cfg)
  graphdef, state = nnx.split((model, optimizer))
  step = jax.jit(step_lib.train_step, static_argnums=0)
  rng = np.random.default_rng(3)
  want = -1.0
  for t in range(5):
    x = rng.normal(0.2, 1.0, (B, D)).astype(np.float32)
    model, _ = nnx.merge(graphdef, state)
    pre = values_numpy(params_of(model), x, cfg)
    mask = reference.batchtopk_mask_numpy(pre, K, cfg.num_selected)[0]
    smallest = pre[mask & (pre > 0)].min()
    if t >= start:
      want = smallest if want < 0 else beta * want + (1 - beta) * smallest
    state, metrics = step(graphdef, state, jnp.asarray(x))
    np.testing.assert_allclose(metrics["threshold"], want, rtol=1e-5, err_msg=str(t))
  model, _ = nnx.merge(graphdef, state)
  assert float(model.threshold[...]) == float(metrics["threshold"])
  p = params_of(model)
  x[:4] *= 8  # loud rows: more latents above the threshold than the training candidates
  pre = values_numpy(p, x, cfg)
  code = np.where(pre > want, pre, 0.0)  # every latent above the threshold, no cap
  assert (code > 0).sum(1).max() > cfg.num_selected  # the test exercises rows past the old cap
  x_hat = (code / reference.decoder_norms_numpy(p, cfg.decoder_norm)) @ p["W_dec"] + p["b_dec"]
  evaluated = step_lib.eval_metrics(graphdef, state, jnp.asarray(x))
  np.testing.assert_allclose(evaluated["fvu"], np.sum((x - x_hat) ** 2) /
                             np.sum((x - x.mean(0)) ** 2), rtol=1e-5)
  values = code
  assert float(evaluated["l0"]) == (values > 0).sum(1).mean() != K  # per token, not k each


def test_config_normalises_and_refuses():
  cfg = SAEConfig(d_in=D, num_latents=N, k=K, matryoshka_prefixes=[8, 16, N])
  assert cfg.matryoshka_prefixes == (8, 16)
  assert SAEConfig(d_in=D, num_latents=N, k=K, architecture="batchtopk").num_selected == 4 * K
  for bad, message in [
      (dict(matryoshka_prefixes=(16, 8)), "matryoshka_prefixes=16,8 must increase"),
      (dict(matryoshka_prefixes=(0, 8)), "each in [1, num_latents=48)"),
      (dict(matryoshka_prefixes=(8, 2 * N)), "each in [1, num_latents=48)"),
      (dict(architecture="batchtopk", multi_topk=True), "multi_topk needs architecture=topk"),
      (dict(matryoshka_prefixes=(8,), multi_topk=True), "multi_topk needs architecture=topk"),
      (dict(architecture="batchtopk", batchtopk_max_k=K - 1), "must be 0 or >= k=3"),
      (dict(architecture="jumprelu"), "architecture='jumprelu'"),
      (dict(threshold_beta=1.0), "threshold_beta=1.0 must be in [0, 1)"),
  ]:
    with pytest.raises(ValueError, match=re.escape(message)):
      SAEConfig(d_in=D, num_latents=N, k=K, **bad)


def test_the_topk_state_is_unchanged():
  """Only BatchTopK has a threshold: a TopK model's variables are the ones it always had."""
  def names(cfg):
    graphdef, state = step_lib.create_state(cfg, step_lib.make_optimizer(1e-3), seed=0)
    return set(state[0].keys())
  assert names(SAEConfig(d_in=D, num_latents=N, k=K, matryoshka_prefixes=(8,))) == {
      "W_enc", "b_enc", "W_dec", "b_dec", "tokens_since_fired"}
  assert names(SAEConfig(d_in=D, num_latents=N, k=K, architecture="batchtopk")) == {
      "W_enc", "b_enc", "W_dec", "b_dec", "tokens_since_fired", "threshold"}
