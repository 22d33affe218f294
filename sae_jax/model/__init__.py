"""The sparse autoencoder: TopK (OpenAI's recipe, sparsify's parametrisation), as a Flax NNX module.

  pre   = ReLU(W_enc (x - b_dec) + b_enc)      dense, the only dense matmul
  z     = TopK_k(pre)                          values [B, k] and indices [B, k]
  x_hat = sum_j z_j W_dec[i_j] + b_dec         a gather of k decoder rows per token

With --decoder_norm=free (SAELens's rescale_acts_by_decoder_norm) the decoder rows keep their
norms s: z = TopK_k(pre * s) and x_hat = sum_j (z_j / s_j) W_dec[i_j] + b_dec. The model computes
both in the unit-row form the export writes: the encoder W_enc * s, b_enc * s and the decoder
rows W_dec / s.

Weights are latent-major (row i of W_enc and of W_dec belong to latent i), so the latent axis is
the leading axis of every per-latent array and shards as P("model", None).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sae_jax.kernels import rows, sharded
from sae_jax.kernels import topk as topk_lib
from sae_jax.config import SAEConfig
from sae_jax.kernels.kernel_plan import KernelPlan

INT32_MAX = np.iinfo(np.int32).max


def kernels():
  """The sparse kernels for the mesh in scope: per shard inside shard_map (sharded.py) on a mesh
  of several devices, else the single-device ones (topk.py)."""
  return sharded if sharded.active() else topk_lib


def row_kernels():
  """The row operations for the mesh in scope: per shard (sharded.py) or whole (rows.py)."""
  return sharded if sharded.active() else rows


class DeadCounter(nnx.Variable):
  """Per-latent bookkeeping updated by the train step, not by the optimizer."""


# Sharding metadata of the per-latent variables (their Adam moments inherit it): the latent axis
# is split over the mesh's "model" axis. Metadata only; sharding.state_shardings applies it.
LATENT_ROWS = dict(out_sharding=("model", None), eager_sharding=False)
LATENTS = dict(out_sharding=("model",), eager_sharding=False)


class SparseAutoencoder(nnx.Module):
  """An SAE of any architecture (cfg.arch decides its selection, state and inference encoder).
  `plan`: the kernels for the devices the model's programs are compiled for (default: this
  process's devices)."""

  def __init__(self, cfg: SAEConfig, *, rngs: nnx.Rngs, plan: KernelPlan | None = None):
    self.cfg = cfg
    self.plan = KernelPlan.for_devices(jax.devices()) if plan is None else plan
    n, d = cfg.num_latents, cfg.d_in
    bound = 1 / np.sqrt(d)  # torch nn.Linear's default init, as sparsify uses
    W_enc = jax.random.uniform(rngs.params(), (n, d), jnp.float32, -bound, bound)
    self.W_enc = nnx.Param(W_enc, **LATENT_ROWS)
    self.b_enc = nnx.Param(jnp.zeros((n,), jnp.float32), **LATENTS)
    # Free rows start as the encoder's, at its norm (~0.58), as measured in docs/benchmarks.md;
    # a copy, so that a step donating the state never donates one buffer twice.
    W_dec = normalize_rows(self.plan, W_enc) if cfg.decoder_norm == "unit" else jnp.copy(W_enc)
    self.W_dec = nnx.Param(W_dec, **LATENT_ROWS)
    self.b_dec = nnx.Param(jnp.zeros((d,), jnp.float32))
    self.tokens_since_fired = DeadCounter(jnp.zeros((n,), jnp.int32), **LATENTS)
    for name, variable in cfg.arch.variables(cfg).items():
      setattr(self, name, variable)

  def _sparse_encoder(self, k: int, k_aux: int, merge_shards: bool = True):
    cfg = self.cfg
    args = (self.plan, k, k_aux, cfg.topk, cfg.topk_recall, cfg.compute_dtype, cfg.weight_grads)
    if sharded.active():
      return sharded.sparse_encoder(*args, capacity=cfg.shard_capacity,
                                    auxk_select=cfg.auxk_select, merge_shards=merge_shards)
    return topk_lib.sparse_encoder(*args)

  def decoder_norms(self) -> jax.Array | None:
    """The decoder rows' norms with --decoder_norm=free (None with unit rows), without gradient:
    they cancel between a latent's value and its decode, so the loss depends on them only through
    which latents are picked."""
    if self.cfg.decoder_norm == "unit":
      return None
    W = jax.lax.stop_gradient(self.W_dec[...])
    return jnp.maximum(jnp.sqrt(row_dots(self.plan, W, W)), 1e-8)

  def encoder_weights(self) -> tuple[jax.Array, jax.Array]:
    """(W_enc, b_enc) whose pre-activations are the latents' values: with free decoder norms,
    each row scaled by its decoder row's norm, so the top k rank by value times norm."""
    norms = self.decoder_norms()
    if norms is None:
      return self.W_enc[...], self.b_enc[...]
    return self.W_enc[...] * norms[:, None], self.b_enc[...] * norms

  def decoder_rows(self) -> jax.Array:
    """W_dec with unit rows, the rows the latents' values decode by (with free norms, each row
    over its norm: computed where the row lives, so nothing of the latent width crosses chips)."""
    norms = self.decoder_norms()
    return self.W_dec[...] if norms is None else self.W_dec[...] / norms[:, None]

  def dead_mask(self) -> jax.Array:
    return self.tokens_since_fired[...] > self.cfg.dead_tokens

  def select(self, x, dead=None):
    """(values, indices, aux_values, aux_indices) of the main (k or 4k) and AuxK selections. On
    latent shards, the main selection is each token's merged top, or, for an architecture that
    does not merge (`Architecture.merges_shard_candidates`), each shard's own candidates."""
    cfg = self.cfg
    dead = jnp.zeros((cfg.num_latents,), bool) if dead is None else dead
    encode = self._sparse_encoder(cfg.num_selected, cfg.num_aux,
                                  cfg.arch.merges_shard_candidates)
    return encode(x, self.b_dec[...], *self.encoder_weights(), dead)

  def encode(self, x) -> tuple[jax.Array, jax.Array]:
    """Top-k values [B, k] (float32, >= 0) and latent indices [B, k] int32, largest first."""
    cfg = self.cfg
    encode = self._sparse_encoder(cfg.k, 0)
    values, indices, _, _ = encode(x, self.b_dec[...], *self.encoder_weights(),
                                   jnp.zeros((cfg.num_latents,), bool))
    return values, indices

  def decode(self, values, indices) -> jax.Array:
    """The reconstruction from `encode`'s values and indices: sum_j values_j W_dec[indices_j] +
    b_dec with unit rows, [B, d]."""
    values = values.astype(jnp.float32)
    return kernels().sparse_decode(self.plan, values, indices, self.decoder_rows(),
                                   self.cfg.weight_grads, self.cfg.compute_dtype) + self.b_dec[...]

  def __call__(self, x) -> jax.Array:
    """The reconstruction as a user encodes (the architecture's inference encoder)."""
    return self.cfg.arch.reconstruct(self, x)[0]

  def pre_activations(self, x) -> jax.Array:
    """Dense ReLU(W_enc (x - b_dec) + b_enc), the latents' values, [B, n] float32."""
    xc = x.astype(jnp.float32) - self.b_dec[...]
    return topk_lib.encoder_pre(xc, *self.encoder_weights(), jnp.dtype(self.cfg.compute_dtype))

  def decode_dense(self, code: jax.Array) -> jax.Array:
    """The reconstruction from dense latent values [B, n], as `decode`."""
    return code @ self.decoder_rows() + self.b_dec[...]

  def normalize_decoder(self) -> None:
    """Unit decoder rows (--decoder_norm=unit) after each update; free rows keep their norms."""
    if self.cfg.decoder_norm == "unit":
      self.W_dec[...] = normalize_rows(self.plan, self.W_dec[...])

  def picks_per_shard(self) -> bool:
    """Whether `select`'s main picks stay on their latent shards (see `select`)."""
    return sharded.active() and not self.cfg.arch.merges_shard_candidates

  def record_firing(self, indices, values, num_tokens: int) -> None:
    """Adds `num_tokens` to every counter (saturating at int32 max) and zeroes the counters of the
    latents picked with a positive value."""
    fired = (sharded.fired if self.picks_per_shard() else rows.fired)(
        indices, values, self.cfg.num_latents)
    count = self.tokens_since_fired[...]
    count = count + jnp.minimum(jnp.int32(num_tokens), INT32_MAX - count)
    self.tokens_since_fired[...] = jnp.where(fired, 0, count)


def row_dots(plan: KernelPlan, a: jax.Array, b: jax.Array) -> jax.Array:
  """(a * b).sum(axis=1) of two [n, d] matrices (per latent shard on a mesh)."""
  return row_kernels().row_dots(plan, a, b)


def normalize_rows(plan: KernelPlan, w: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Each row of w scaled to unit norm (rows of norm below eps are divided by eps)."""
  return row_kernels().normalize_rows(plan, w, eps)


def geometric_median(x, iters: int = 100, eps: float = 1e-8) -> jax.Array:
  """The point minimising the summed Euclidean distance to the rows of x (Weiszfeld's iteration,
  started at the mean), float32 [d]. The b_dec init of OpenAI's recipe."""
  x = jnp.asarray(x, jnp.float32)

  def step(_, y):
    w = 1 / jnp.maximum(jnp.linalg.norm(x - y, axis=-1), eps)
    return (w[:, None] * x).sum(0) / w.sum()

  return jax.lax.fori_loop(0, iters, step, x.mean(0))
