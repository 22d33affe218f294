"""The sparse kernels against plain autodiff of a dense reference, and the model's pieces."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sae_jax.training import step as step_lib
from sae_jax.kernels import topk as topk_lib
from sae_jax.kernels.kernel_plan import KernelPlan
from sae_jax.config import SAEConfig
from sae_jax.model import SparseAutoencoder, geometric_median, normalize_rows

# The kernels of a CPU host where sae_jax.kernels.native could not be built (XLA gathers and
# scatters), and of a GPU (dense products, grouped top-k), here compiled for the CPU.
XLA_CPU = KernelPlan.for_platform("cpu", use_native=False)
ACCELERATOR = KernelPlan.for_platform("gpu")

D, N, K, B = 12, 48, 3, 20


def make_model(dead_latents: int = 0, plan=None, **overrides) -> SparseAutoencoder:
  cfg = SAEConfig(d_in=D, num_latents=N, k=K, dead_tokens=100, **overrides)
  model = SparseAutoencoder(cfg, rngs=nnx.Rngs(0), plan=plan)
  rng = np.random.default_rng(1)
  model.b_enc[...] = jnp.asarray(rng.normal(0, 0.1, N), jnp.float32)
  model.b_dec[...] = jnp.asarray(rng.normal(0, 0.3, D), jnp.float32)
  count = np.zeros(N, np.int32)
  count[rng.permutation(N)[:dead_latents]] = 1000
  model.tokens_since_fired[...] = jnp.asarray(count)
  if model.cfg.decoder_norm == "free":  # norms far enough apart to change which latents win
    model.W_dec[...] *= jnp.asarray(rng.uniform(0.3, 3.0, (N, 1)), jnp.float32)
  return model


def batch(seed: int = 2) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).normal(0.5, 1.0, (B, D)), jnp.float32)


def dense_loss(params, x, cfg: SAEConfig, dead):
  """The same loss with a dense [B, n] code, a dense decoder matmul and plain autodiff. Free
  decoder norms as SAELens writes them, gradients through the norms included: values pre * s,
  the top k of those, decoded as values / s."""
  W_enc, b_enc, W_dec, b_dec = params["W_enc"], params["b_enc"], params["W_dec"], params["b_dec"]
  norms = jnp.linalg.norm(W_dec, axis=1) if cfg.decoder_norm == "free" else 1.0
  pre = jax.nn.relu((x - b_dec) @ W_enc.T + b_enc) * norms
  rows = jnp.arange(x.shape[0])[:, None]

  def code(scores, k):
    _, idx = jax.lax.top_k(scores, k)
    return jnp.zeros_like(pre).at[rows, idx].set(pre[rows, idx]) / norms

  total_variance = jnp.sum((x - x.mean(0)) ** 2)
  x_hat = code(pre, cfg.k) @ W_dec + b_dec
  loss = jnp.sum((x - x_hat) ** 2) / total_variance
  if cfg.multi_topk:
    loss += jnp.sum((x - code(pre, 4 * cfg.k) @ W_dec - b_dec) ** 2) / total_variance / 8
  num_dead = jnp.sum(dead)
  if cfg.num_aux and num_dead:
    z_aux = code(jnp.where(dead, pre, -1.0), cfg.num_aux) * dead
    e_hat = z_aux @ W_dec
    scale = jnp.minimum(num_dead / cfg.num_aux, 1.0)
    loss += cfg.auxk_alpha * scale * jnp.sum(
        (e_hat - jax.lax.stop_gradient(x - x_hat)) ** 2) / total_variance
  return loss


def params_of(model):
  return {name: getattr(model, name)[...] for name in ("W_enc", "b_enc", "W_dec", "b_dec")}


@pytest.mark.parametrize("multi_topk,auxk_alpha,dead_latents", [
    (False, 0.0, 0),  # plain TopK
    (True, 1 / 32, 0),  # Multi-TopK; AuxK on but nothing dead
    (False, 0.5, 3),  # fewer dead latents than k_aux: some AuxK picks are masked
    (True, 0.5, 30),  # everything at once, more dead latents than k_aux
])
@pytest.mark.parametrize("weight_grads", ["scatter", "xla_scatter", "matmul", "accelerator"])
@pytest.mark.parametrize("decoder_norm", ["free", "unit"])
def test_sparse_gradients_match_dense_autodiff(multi_topk, auxk_alpha, dead_latents, weight_grads,
                                               decoder_norm):
  plan = None
  if weight_grads == "accelerator":  # "auto" as on a GPU: dense decodes and weight gradients
    plan, weight_grads = ACCELERATOR, "auto"
  if weight_grads == "xla_scatter":  # a CPU host without the native kernels
    plan, weight_grads = XLA_CPU, "scatter"
  model = make_model(dead_latents, plan, multi_topk=multi_topk, auxk_alpha=auxk_alpha, k_aux=5,
                     weight_grads=weight_grads, decoder_norm=decoder_norm)
  x, dead = batch(), model.dead_mask()
  graphdef, state = nnx.split(model)

  def sparse_loss(params, x):
    traced = nnx.merge(graphdef, state, copy=True)
    nnx.update(traced, params)
    return step_lib.losses(traced, x, dead)[0]

  params = params_of(model)
  want_loss, (want, want_x) = jax.value_and_grad(dense_loss, argnums=(0, 1))(
      params, x, model.cfg, dead)  # eager: the dense reference branches on the dead count
  # Once with x as data (b_dec's centring gradient via db_enc @ W_enc), once differentiating x too.
  got_loss, got = jax.jit(jax.value_and_grad(sparse_loss))(params, x)
  _, (got_too, got_x) = jax.jit(jax.value_and_grad(sparse_loss, argnums=(0, 1)))(params, x)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
  for name in params:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-7, err_msg=name)
    np.testing.assert_allclose(got_too[name], want[name], rtol=1e-5, atol=1e-7, err_msg=name)
  np.testing.assert_allclose(got_x, want_x, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("decoder_norm", ["free", "unit"])
def test_encode_decode_and_dense_pre_activations_agree(decoder_norm):
  model, x = make_model(decoder_norm=decoder_norm), batch()
  values, indices = model.encode(x)
  assert values.shape == indices.shape == (B, K) and indices.dtype == jnp.int32
  pre = np.asarray(model.pre_activations(x))
  assert pre.shape == (B, N) and (pre >= 0).all()
  W_dec = np.asarray(model.W_dec[...])
  norms = np.linalg.norm(W_dec, axis=1) if decoder_norm == "free" else np.ones(N)
  raw = np.maximum((np.asarray(x) - np.asarray(model.b_dec[...])) @ np.asarray(model.W_enc[...]).T
                   + np.asarray(model.b_enc[...]), 0)
  np.testing.assert_allclose(pre, raw * norms, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(indices, np.argsort(-pre, axis=1, kind="stable")[:, :K])
  np.testing.assert_allclose(values, np.take_along_axis(pre, np.asarray(indices), 1), rtol=1e-6)
  z = np.zeros((B, N), np.float32)
  np.put_along_axis(z, np.asarray(indices), np.asarray(values), 1)
  want = (z / norms) @ W_dec + np.asarray(model.b_dec[...])
  np.testing.assert_allclose(model(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("decoder_norm", ["free", "unit"])
def test_init_is_sparsify_like(decoder_norm):
  cfg = SAEConfig(d_in=64, num_latents=256, k=8, decoder_norm=decoder_norm)
  model = SparseAutoencoder(cfg, rngs=nnx.Rngs(0))
  W_enc, W_dec = np.asarray(model.W_enc[...]), np.asarray(model.W_dec[...])
  assert np.abs(W_enc).max() <= 1 / 8 and np.abs(W_enc).max() > 0.95 / 8
  if decoder_norm == "unit":
    np.testing.assert_allclose(np.linalg.norm(W_dec, axis=1), 1, rtol=1e-6)
    np.testing.assert_allclose(W_dec, normalize_rows(XLA_CPU, W_enc), rtol=1e-6)
  else:  # the encoder's rows, at their norm (~sqrt(1/3) for uniform entries)
    np.testing.assert_array_equal(W_dec, W_enc)
  assert not np.asarray(model.b_enc[...]).any() and not np.asarray(model.b_dec[...]).any()
  assert not isinstance(model.tokens_since_fired, nnx.Param)


def test_bfloat16_and_approx_topk():
  x = batch()
  exact = make_model()
  approx = make_model(topk="approx", topk_recall=0.9)
  np.testing.assert_array_equal(approx.encode(x)[1], exact.encode(x)[1])  # exact on CPU
  bf16 = make_model(compute_dtype="bfloat16")
  assert bf16.encode(x)[0].dtype == jnp.float32
  np.testing.assert_allclose(bf16.pre_activations(x), exact.pre_activations(x), atol=0.05)
  assert bf16.W_enc[...].dtype == jnp.float32


def test_bfloat16_matmul_weight_gradients_track_float32():
  """The dense weight-gradient product with bfloat16 operands (what "auto" picks on a GPU with
  --compute_dtype=bfloat16) stays within bfloat16 rounding of the float32 scatter."""
  x, dead = batch(), jnp.zeros((N,), bool)
  grads = {}
  for weight_grads in ("scatter", "matmul"):
    model = make_model(compute_dtype="bfloat16", weight_grads=weight_grads)
    grads[weight_grads] = nnx.grad(lambda m: step_lib.losses(m, x, dead)[0])(model)
  for name in ("W_enc", "W_dec"):
    want, got = grads["scatter"][name][...], grads["matmul"][name][...]
    assert np.linalg.norm(got - want) <= 1e-2 * np.linalg.norm(want), name
    assert np.abs(want).max() > 0


def test_dead_counter_saturates_and_resets_on_positive_picks():
  model = make_model()
  model.tokens_since_fired[...] = jnp.array([0, 5, np.iinfo(np.int32).max - 3] + [7] * (N - 3),
                                            jnp.int32)
  indices = jnp.array([[0, 3], [3, 4]], jnp.int32)
  values = jnp.array([[1.0, 0.5], [0.2, 0.0]])  # latent 4 is picked at zero: it did not fire
  model.record_firing(indices, values, num_tokens=10)
  count = np.asarray(model.tokens_since_fired[...])
  assert count[0] == 0 and count[3] == 0
  assert count[1] == 15 and count[4] == 17
  assert count[2] == np.iinfo(np.int32).max


def test_geometric_median_beats_the_mean_on_outliers():
  rng = np.random.default_rng(0)
  x = np.concatenate([rng.normal(0, 0.1, (200, 3)), np.full((20, 3), 100.0)]).astype(np.float32)
  median = np.asarray(geometric_median(x))
  assert np.linalg.norm(median) < 0.2 < np.linalg.norm(x.mean(0))

  def cost(y):
    return np.linalg.norm(x - y, axis=1).sum()

  for delta in np.eye(3) * 1e-2:
    assert cost(median) <= min(cost(median + delta), cost(median - delta))


def test_sparse_decode_gradient_adds_into_the_picked_rows():
  W = jnp.asarray(np.random.default_rng(0).normal(size=(N, D)), jnp.float32)
  v = jnp.ones((2, K))
  idx = jnp.array([[0, 1, 1], [2, 3, 0]], jnp.int32)
  grad = jax.grad(lambda W: topk_lib.sparse_decode(XLA_CPU, v, idx, W).sum())(W)
  assert np.asarray(grad[1]).tolist() == [2.0] * D and np.asarray(grad[0]).tolist() == [2.0] * D
  assert not np.asarray(grad[4:]).any()
