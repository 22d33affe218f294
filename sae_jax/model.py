"""The TopK sparse autoencoder (OpenAI's recipe, sparsify's parametrisation), as a Flax NNX module.

  pre   = ReLU(W_enc (x - b_dec) + b_enc)      dense, the only dense matmul
  z     = TopK_k(pre)                          values [B, k] and indices [B, k]
  x_hat = sum_j z_j W_dec[i_j] + b_dec         a gather of k decoder rows per token

Weights are latent-major (row i of W_enc and of W_dec belong to latent i), so the latent axis is
the leading axis of every per-latent array and shards as P("model", None).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sae_jax import rows, sharded
from sae_jax import topk as topk_lib
from sae_jax.kernel_plan import KernelPlan
from sae_jax.select import TOPK_METHODS

INT32_MAX = np.iinfo(np.int32).max
ARCHITECTURES = ("topk", "batchtopk")


@dataclasses.dataclass(frozen=True)
class SAEConfig:
  d_in: int
  num_latents: int
  k: int
  multi_topk: bool = False  # + FVU of the top-4k reconstruction / 8
  auxk_alpha: float = 1 / 32  # 0 disables AuxK
  dead_tokens: int = 10_000_000  # a latent is dead after this many tokens without firing
  k_aux: int | None = None  # None -> d_in // 2
  compute_dtype: str = "float32"  # "float32" | "bfloat16": the encoder matmul's input dtype
  topk: str = "exact"  # "exact" (lax.top_k) | "approx" (lax.approx_max_k)
  topk_recall: float = 0.95
  # On a latent-sharded mesh, each shard offers ceil(shard_capacity * k / shards) candidates to
  # the global top-k (and likewise for AuxK): exact unless one shard holds more of a token's
  # winners, and m*k -> capacity*k fewer candidates to all-gather. 0: exact (min(k, n/m) each).
  shard_capacity: float = 0.0
  # How AuxK selects on a latent-sharded mesh (sharded.sparse_encoder): "per_shard" takes each
  # shard's top dead latents, k_aux in all (k_aux // shards each, one more on the first
  # k_aux % shards), and gathers nothing; "exact" the global top
  # k_aux, all-gathering [B, shards * k_aux] candidates every step. One device: always exact.
  auxk_select: str = "per_shard"
  # How the backward forms the W_enc and W_dec gradients: "scatter" adds the B*k picked rows,
  # "matmul" multiplies a dense [B, n] matrix of the picks (in compute_dtype), "auto" takes the
  # matmul on GPU/TPU when n/k (per shard) <= topk.MAX_ROWS_PER_PICK, else the scatter.
  weight_grads: str = "auto"
  # "topk": each token keeps its k largest pre-activations. "batchtopk" (Bussmann et al. 2024):
  # the batch keeps its B*k largest, from each token's top `batchtopk_max_k` (0: min(4k, n));
  # inference is a JumpReLU at the learned `threshold` (an EMA of the smallest kept value, from
  # optimizer step `threshold_start_step` on, weight `threshold_beta` on the old value).
  architecture: str = "topk"
  batchtopk_max_k: int = 0
  threshold_beta: float = 0.999
  threshold_start_step: int = 1000
  # Matryoshka (Bussmann et al. 2025): the inner widths; latents [0, w) alone must also
  # reconstruct the input. The loss is the mean FVU over these levels and the full dictionary.
  matryoshka_prefixes: tuple[int, ...] = ()

  def __post_init__(self):
    # run.json gives a list; a trailing num_latents is the full level, always there.
    prefixes = tuple(int(w) for w in self.matryoshka_prefixes)
    if prefixes and prefixes[-1] == self.num_latents:
      prefixes = prefixes[:-1]
    object.__setattr__(self, "matryoshka_prefixes", prefixes)
    if not 0 < self.k <= self.num_latents:
      raise ValueError(f"k={self.k} must be in [1, num_latents={self.num_latents}]")
    if self.multi_topk and 4 * self.k > self.num_latents:
      raise ValueError(f"multi_topk needs 4k={4 * self.k} <= num_latents={self.num_latents}")
    if self.compute_dtype not in ("float32", "bfloat16"):
      raise ValueError(f"compute_dtype={self.compute_dtype!r}; expected float32 or bfloat16")
    if self.weight_grads not in rows.WEIGHT_GRADS:
      raise ValueError(f"weight_grads={self.weight_grads!r}; expected one of {rows.WEIGHT_GRADS}")
    if self.topk not in TOPK_METHODS:
      raise ValueError(f"topk={self.topk!r}; expected one of {TOPK_METHODS}")
    if self.auxk_select not in sharded.AUXK_SELECTS:
      raise ValueError(f"auxk_select={self.auxk_select!r}; expected one of "
                       f"{sharded.AUXK_SELECTS}")
    if self.shard_capacity and self.shard_capacity < 1:
      raise ValueError(f"shard_capacity={self.shard_capacity} must be 0 (exact) or >= 1")
    if self.auxk_alpha < 0 or self.dead_tokens < 0:
      raise ValueError("auxk_alpha and dead_tokens must be >= 0")
    if self.architecture not in ARCHITECTURES:
      raise ValueError(f"architecture={self.architecture!r}; expected one of {ARCHITECTURES}")
    if any(b <= a for a, b in zip(prefixes, prefixes[1:])) or not all(
        0 < w < self.num_latents for w in prefixes):
      raise ValueError(f"matryoshka_prefixes={','.join(map(str, prefixes))} must increase "
                       f"strictly, each in [1, num_latents={self.num_latents})")
    if self.multi_topk and (self.architecture != "topk" or prefixes):
      raise ValueError("multi_topk needs architecture=topk and no matryoshka_prefixes")
    if not 0 <= self.batchtopk_max_k <= self.num_latents:
      raise ValueError(f"batchtopk_max_k={self.batchtopk_max_k} must be in [0, num_latents="
                       f"{self.num_latents}]")
    if self.architecture == "batchtopk" and self.candidates < self.k:
      raise ValueError(f"batchtopk_max_k={self.batchtopk_max_k} must be 0 or >= k={self.k}")
    if not 0 <= self.threshold_beta < 1 or self.threshold_start_step < 0:
      raise ValueError(f"threshold_beta={self.threshold_beta} must be in [0, 1) and "
                       f"threshold_start_step={self.threshold_start_step} >= 0")

  @property
  def num_aux(self) -> int:
    """How many dead latents AuxK reconstructs the residual with (0 when AuxK is off)."""
    if self.auxk_alpha == 0:
      return 0
    k_aux = self.d_in // 2 if self.k_aux is None else self.k_aux
    return min(k_aux, self.num_latents)

  @property
  def candidates(self) -> int:
    """BatchTopK's candidates per token: batchtopk_max_k, or min(4k, num_latents)."""
    return self.batchtopk_max_k or min(4 * self.k, self.num_latents)

  @property
  def num_selected(self) -> int:
    """Width of the main selection: 4k with Multi-TopK (its first k columns are the top-k),
    BatchTopK's candidates per token."""
    if self.architecture == "batchtopk":
      return self.candidates
    return 4 * self.k if self.multi_topk else self.k


def kernels():
  """The sparse kernels for the mesh in scope: per shard inside shard_map (sharded.py) on a mesh
  of several devices, else the single-device ones (topk.py)."""
  return sharded if sharded.active() else topk_lib


def row_kernels():
  """The row operations for the mesh in scope: per shard (sharded.py) or whole (rows.py)."""
  return sharded if sharded.active() else rows


class DeadCounter(nnx.Variable):
  """Per-latent bookkeeping updated by the train step, not by the optimizer."""


class Threshold(nnx.Variable):
  """BatchTopK's inference threshold (a scalar, replicated): an EMA the train step updates, not
  the optimizer. -1 until the first update."""


# Sharding metadata of the per-latent variables (their Adam moments inherit it): the latent axis
# is split over the mesh's "model" axis. Metadata only; sharding.state_shardings applies it.
LATENT_ROWS = dict(out_sharding=("model", None), eager_sharding=False)
LATENTS = dict(out_sharding=("model",), eager_sharding=False)


class TopKSAE(nnx.Module):
  """`plan`: the kernels for the devices the model's programs are compiled for (default: this
  process's devices)."""

  def __init__(self, cfg: SAEConfig, *, rngs: nnx.Rngs, plan: KernelPlan | None = None):
    self.cfg = cfg
    self.plan = KernelPlan.for_devices(jax.devices()) if plan is None else plan
    n, d = cfg.num_latents, cfg.d_in
    bound = 1 / np.sqrt(d)  # torch nn.Linear's default init, as sparsify uses
    W_enc = jax.random.uniform(rngs.params(), (n, d), jnp.float32, -bound, bound)
    self.W_enc = nnx.Param(W_enc, **LATENT_ROWS)
    self.b_enc = nnx.Param(jnp.zeros((n,), jnp.float32), **LATENTS)
    self.W_dec = nnx.Param(normalize_rows(self.plan, W_enc), **LATENT_ROWS)
    self.b_dec = nnx.Param(jnp.zeros((d,), jnp.float32))
    self.tokens_since_fired = DeadCounter(jnp.zeros((n,), jnp.int32), **LATENTS)
    if cfg.architecture == "batchtopk":  # the TopK state has no such variable
      self.threshold = Threshold(jnp.float32(-1))

  def _sparse_encoder(self, k: int, k_aux: int):
    cfg = self.cfg
    args = (self.plan, k, k_aux, cfg.topk, cfg.topk_recall, cfg.compute_dtype, cfg.weight_grads)
    if sharded.active():
      return sharded.sparse_encoder(*args, capacity=cfg.shard_capacity,
                                    auxk_select=cfg.auxk_select)
    return topk_lib.sparse_encoder(*args)

  def dead_mask(self) -> jax.Array:
    return self.tokens_since_fired[...] > self.cfg.dead_tokens

  def select(self, x, dead=None):
    """(values, indices, aux_values, aux_indices) of the main (k or 4k) and AuxK selections."""
    cfg = self.cfg
    dead = jnp.zeros((cfg.num_latents,), bool) if dead is None else dead
    encode = self._sparse_encoder(cfg.num_selected, cfg.num_aux)
    return encode(x, self.b_dec[...], self.W_enc[...], self.b_enc[...], dead)

  def encode(self, x) -> tuple[jax.Array, jax.Array]:
    """Top-k values [B, k] (float32, >= 0) and latent indices [B, k] int32, largest first."""
    cfg = self.cfg
    encode = self._sparse_encoder(cfg.k, 0)
    values, indices, _, _ = encode(x, self.b_dec[...], self.W_enc[...], self.b_enc[...],
                                   jnp.zeros((cfg.num_latents,), bool))
    return values, indices

  def jumprelu_code(self, x) -> jax.Array:
    """BatchTopK at inference: the dense JumpReLU code [B, n] at the learned threshold, every
    latent above it kept (topk.jumprelu, as scan and the exported dictionary apply it)."""
    return topk_lib.jumprelu(self.pre_activations(x), self.threshold[...])

  def decode(self, values, indices) -> jax.Array:
    """sum_j values_j W_dec[indices_j] + b_dec, [B, d]."""
    values = values.astype(jnp.float32)
    return kernels().sparse_decode(self.plan, values, indices, self.W_dec[...],
                                   self.cfg.weight_grads, self.cfg.compute_dtype) + self.b_dec[...]

  def __call__(self, x) -> jax.Array:
    """The reconstruction as a user encodes: TopK, or BatchTopK's JumpReLU."""
    if self.cfg.architecture == "batchtopk":
      return self.jumprelu_code(x) @ self.W_dec[...] + self.b_dec[...]
    return self.decode(*self.encode(x))

  def pre_activations(self, x) -> jax.Array:
    """Dense ReLU(W_enc (x - b_dec) + b_enc), [B, n] float32."""
    xc = x.astype(jnp.float32) - self.b_dec[...]
    return topk_lib.encoder_pre(xc, self.W_enc[...], self.b_enc[...],
                                jnp.dtype(self.cfg.compute_dtype))

  def normalize_decoder(self) -> None:
    self.W_dec[...] = normalize_rows(self.plan, self.W_dec[...])

  def record_firing(self, indices, values, num_tokens: int) -> None:
    """Adds `num_tokens` to every counter (saturating at int32 max) and zeroes the counters of the
    latents picked with a positive value."""
    fired = jnp.zeros((self.cfg.num_latents,), jnp.int32).at[indices.reshape(-1)].max(
        (values.reshape(-1) > 0).astype(jnp.int32)) > 0
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
