"""BatchTopK (Bussmann et al. 2024): the batch keeps its B*k largest pre-activations, not each token
its k; inference uses a learned threshold instead (a JumpReLU).

The candidates are each token's top `SAEConfig.candidates`, from the same sparse encoder as TopK;
on latent shards, each shard's own top c, left where they are (the cut needs no order across
shards, so nothing is gathered). The batch's cut is the (B*k)-th largest candidate, found exactly
by bisection on the float32 bit patterns: 31 rounds of a count over the candidates and a scalar
sum, which XLA turns into an all-reduce over the mesh. A sort or a top_k over the flattened batch
would gather all B*c candidates on every device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sae_jax.formats import dictionary
from sae_jax.kernels import sharded
from sae_jax.kernels import topk as topk_lib
from sae_jax.architectures.base import Architecture

THRESHOLD = dictionary.THRESHOLD


class Threshold(nnx.Variable):
  """BatchTopK's inference threshold (a scalar, replicated): an EMA the train step updates, not
  the optimizer. -1 until the first update."""


def candidates(cfg) -> int:
  """BatchTopK's candidates per token: batchtopk_max_k, or min(4k, num_latents)."""
  return cfg.batchtopk_max_k or min(4 * cfg.k, cfg.num_latents)


def kth_largest(values: jax.Array, count: int) -> jax.Array:
  """The `count`-th largest entry of `values` (float32, all >= 0, any shape), exactly."""
  # Non-negative floats order as their bit patterns do; -0.0 (negative as int32) becomes +0.0.
  bits = jnp.maximum(jax.lax.bitcast_convert_type(jax.lax.stop_gradient(values), jnp.int32), 0)

  def halve(_, bounds):
    lo, hi = bounds  # invariant: at least `count` entries are >= lo, fewer are >= hi
    mid = lo + (hi - lo) // 2
    enough = jnp.sum(bits >= mid) >= count
    return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

  lo, _ = jax.lax.fori_loop(0, 31, halve, (jnp.int32(0), jnp.int32(np.iinfo(np.int32).max)))
  return jax.lax.bitcast_convert_type(lo, jnp.float32)


def select(values: jax.Array, k: int, blocks: int = 1) -> tuple[jax.Array, jax.Array]:
  """(values [B, c] with all but the batch's B*k largest set to 0, capped_fraction). `values`
  holds `blocks` equal blocks of candidates per token, each sorted (one per latent shard).

  Ties at the cut are all kept. When capped_fraction (the fraction of tokens with a block whose
  last candidate is kept) is 0, the selection is exactly that of the whole flattened [B, n] batch:
  every value a token has above the cut is then among its candidates (each block's last is below
  the cut, and the rest of that block's latents are smaller still), so the candidates and the full
  batch count the same entries above any value >= the cut, and their (B*k)-th largest agree. A
  positive capped_fraction says the cap may have changed the cut; raise --batchtopk_max_k then."""
  cut = kth_largest(values, values.shape[0] * k)
  kept = jnp.where(values >= cut, values, 0.0)
  last = kept.reshape(kept.shape[0], blocks, -1)[:, :, -1]
  return kept, jnp.mean(jnp.any(last > 0, axis=1).astype(jnp.float32))


def updated_threshold(cfg, threshold: jax.Array, kept: jax.Array, step: jax.Array) -> jax.Array:
  """The inference threshold after a step at optimizer step `step` (counted from 0) that kept
  `kept`: from threshold_start_step on, an EMA of the batch's smallest positive kept value, started
  at the first such value (as dictionary_learning's BatchTopK trainer does)."""
  smallest = jnp.min(jnp.where(kept > 0, kept, jnp.inf))
  beta = cfg.threshold_beta
  ema = jnp.where(threshold < 0, smallest, beta * threshold + (1 - beta) * smallest)
  return jnp.where((step >= cfg.threshold_start_step) & jnp.isfinite(smallest), ema, threshold)


def jumprelu_code(model, x: jax.Array) -> jax.Array:
  """The dense JumpReLU code [B, n] at the learned threshold, every latent above it kept
  (topk.jumprelu, as scan and the exported dictionary apply it)."""
  return topk_lib.jumprelu(model.pre_activations(x), model.threshold[...])


class BatchTopK(Architecture):
  name = "batchtopk"
  inference_differs = True
  exported_variables = (THRESHOLD,)
  merges_shard_candidates = False

  def validate(self, cfg) -> None:
    if cfg.multi_topk:
      raise ValueError("multi_topk needs architecture=topk")
    if candidates(cfg) < cfg.k:
      raise ValueError(f"batchtopk_max_k={cfg.batchtopk_max_k} must be 0 or >= k={cfg.k}")

  def selection_width(self, cfg) -> int:
    return candidates(cfg)

  def select(self, cfg, values, indices):
    kept, capped_fraction = select(values, cfg.k, sharded.shard_count())
    return kept, indices, {"capped_fraction": capped_fraction}

  def variables(self, cfg) -> dict:
    return {THRESHOLD: Threshold(jnp.float32(-1))}

  def update_state(self, model, top_values, step) -> dict:
    # From the picks of the weights before the update.
    model.threshold[...] = updated_threshold(model.cfg, model.threshold[...], top_values, step)
    return {THRESHOLD: model.threshold[...]}

  def reconstruct(self, model, x):
    code = jumprelu_code(model, x)
    return model.decode_dense(code), code

  def loggable(self, scalars: dict) -> dict:
    if scalars[THRESHOLD] < 0:  # before the threshold is learned there is no JumpReLU
      return {name: v for name, v in scalars.items() if not name.startswith("inference_")}
    return scalars

  def exported(self, variables, cfg, step) -> dict:
    threshold = float(np.asarray(variables[THRESHOLD]))
    if threshold < 0:
      raise dictionary.DictionaryError(
          f"step {step} has no learned BatchTopK threshold yet (it is estimated from "
          f"--threshold_start_step={cfg['threshold_start_step']} on); export a later "
          "--step or train past it")
    return {THRESHOLD: np.full(np.shape(variables["b_enc"]), threshold, np.float32)}

  def start_from(self, params, source, note) -> dict:
    if THRESHOLD not in params:
      return params
    thresholds = params[THRESHOLD]
    if np.any(thresholds != thresholds[0]):
      raise ValueError(f"{source} has per-latent thresholds ({thresholds.min():.4g} to "
                       f"{thresholds.max():.4g}); a BatchTopK SAE learns one for all latents")
    return {**params, THRESHOLD: thresholds[0]}
