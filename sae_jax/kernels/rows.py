"""Row gathers, scatters and reductions of [n, d] matrices, in the forms the kernel plan picks:
sae_jax.kernels.native's CPU kernels, XLA gathers and scatters, or dense [B, n] products on
accelerators."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sae_jax.kernels import native
from sae_jax.kernels.kernel_plan import KernelPlan

# The gathers (and the scatters on accelerators) run CHUNK picks at a time inside a loop. Done in
# one go, XLA materialises a [B, k, d] tensor (the gathered rows, or the scatter's updates), and
# writing that fresh buffer was the largest cost of the step on CPU (the gather-then-dot decoder
# was ~10x slower).
CHUNK = 8


def _chunks(indices: jax.Array, *per_pick: jax.Array):
  """Pads the pick axis to a multiple of CHUNK (index 0, weight 0) and returns (count, arrays)."""
  picks = indices.shape[1]
  pad = -picks % CHUNK
  padded = [jnp.pad(a, ((0, 0), (0, pad))) for a in (indices, *per_pick)]
  return (picks + pad) // CHUNK, padded


def _slice(a: jax.Array, chunk) -> jax.Array:
  return jax.lax.dynamic_slice_in_dim(a, chunk * CHUNK, CHUNK, axis=1)


WEIGHT_GRADS = ("auto", "scatter", "matmul")
# On an accelerator, dense products over all n latents beat the sparse ops when a matrix has few
# rows per pick. An H100 ran the paper's SAE (n/k = 512, bfloat16) at ~0.8e15 FLOP/s in matmuls,
# ~3e12 B/s in row gathers and ~0.3e12 additions/s in row scatter-adds: the weight-gradient matmul
# won from n/k = 1024 down (tied at 2048), a decoder matmul beats the gather below ~250 rows per
# pick (AuxK's k_aux = d/2 picks: n/k_aux = 64 at the paper's size). float32 matmuls run ~16x
# slower, so the limits shrink by 16 (n/k = 512 at d = 512: the scatter won by 20%).
MAX_ROWS_PER_PICK = {  # compute dtype -> (weight-gradient matmul, dense decode)
    "bfloat16": (1024, 256),
    "float32": (64, 16),
}


def weight_grad_dtype(plan: KernelPlan, mode: str, num_rows: int, picks: int, compute_dtype):
  """The operand dtype of the dense weight-gradient matmul, or None for the sparse scatter."""
  if mode not in WEIGHT_GRADS:
    raise ValueError(f"weight_grads={mode!r}; expected one of {WEIGHT_GRADS}")
  if mode == "auto":
    limit = MAX_ROWS_PER_PICK[jnp.dtype(compute_dtype).name][0]
    mode = "matmul" if plan.dense_products and num_rows <= limit * picks else "scatter"
  return jnp.dtype(compute_dtype) if mode == "matmul" else None


def dense_decode(plan: KernelPlan, num_rows: int, picks: int, compute_dtype) -> bool:
  """Whether a decode of `picks` rows per token runs as a dense [B, n] x [n, d] product."""
  limit = MAX_ROWS_PER_PICK[jnp.dtype(compute_dtype).name][1]
  return plan.dense_products and num_rows <= limit * picks


def add_picks(dense: jax.Array, indices: jax.Array, weights: jax.Array) -> jax.Array:
  """dense [B, n] plus weights[b, j] at (b, indices[b, j])."""
  rows = jnp.arange(dense.shape[0])[:, None]
  return dense.at[rows, indices].add(weights.astype(dense.dtype))


def fired(indices: jax.Array, values: jax.Array, num_rows: int) -> jax.Array:
  """Which of `num_rows` rows the picks (indices, values) hit with a positive value, [num_rows]
  bool."""
  return jnp.zeros((num_rows,), jnp.int32).at[indices.reshape(-1)].max(
      (values.reshape(-1) > 0).astype(jnp.int32)) > 0


def picked_weight_grads(picked: jax.Array, rows: jax.Array):
  """(picked^T rows [n, d], picked's column sums [n]), float32, from a dense [B, n] pick matrix:
  the backward of a dense layer, one matmul in picked's dtype."""
  dense_m = jax.lax.dot_general(picked, rows.astype(picked.dtype), (((0,), (0,)), ((), ())),
                                preferred_element_type=jnp.float32)
  return dense_m, jnp.sum(picked, axis=0, dtype=jnp.float32)


def weight_grads(plan: KernelPlan, indices: jax.Array, weights: jax.Array, rows: jax.Array,
                 num_rows: int, matmul_dtype=None, sum_table: jax.Array | None = None):
  """sum over (b, j) of weights[b, j] * rows[b], added into row indices[b, j] of an [n, d] zero
  matrix, the matching [n] sum of weights, and, given an [n, d] sum_table, that sum @ sum_table
  (else None).

  With `matmul_dtype`: `picked_weight_grads` of the picks made dense. Otherwise a scatter-add of
  the B*k weighted rows: on CPU `native.row_grads` or, without it, in target-row order
  (`_sorted_row_scatter`); on an accelerator CHUNK picks at a time."""
  if matmul_dtype is not None:
    picked = add_picks(jnp.zeros((indices.shape[0], num_rows), matmul_dtype), indices, weights)
    dense_m, dense_w = picked_weight_grads(picked, rows)
  elif plan.native:
    return native.row_grads(indices, weights, rows, num_rows, sum_table)
  else:
    dense_w = jnp.zeros((num_rows,), jnp.float32).at[indices].add(weights)
    dense_m = (_chunked_row_scatter(indices, weights, rows, num_rows) if plan.accelerator
               else _sorted_row_scatter(indices, weights, rows, num_rows))
  return dense_m, dense_w, None if sum_table is None else dense_w @ sum_table


def _chunked_row_scatter(indices: jax.Array, weights: jax.Array, rows: jax.Array, num_rows: int):
  """The [n, d] part of `weight_grads` on an accelerator, CHUNK picks per scatter."""
  num_chunks, (indices, weights) = _chunks(indices, weights)

  def body(chunk, dense_m):
    w, idx = _slice(weights, chunk), _slice(indices, chunk)
    return dense_m.at[idx].add(w[..., None] * rows[:, None, :])

  dense_m = jnp.zeros((num_rows, rows.shape[-1]), jnp.float32)
  return jax.lax.fori_loop(0, num_chunks, body, dense_m)


# Picks per scatter of `_sorted_row_scatter`: 2048 ran fastest of 1024 to 8192 at d=512.
SORTED_CHUNK = 2048


def _sorted_row_scatter(indices: jax.Array, weights: jax.Array, rows: jax.Array, num_rows: int):
  """The [n, d] part of `weight_grads`, with the B*k picks sorted by target row first.

  XLA:CPU runs a scatter as one loop over its updates. In token order each update lands on a
  random row of the [n, d] result (32 MB at n=16384, d=512: beyond the caches); in target order
  consecutive updates land on the row just written, and only the gathered source rows ([B, d],
  8 MB) are read at random. 66 against 98 CPU ms per scatter at d=512, n=16384, k=32, B=4096."""
  picks = indices.shape[1]
  flat = indices.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  pad = -flat.size % SORTED_CHUNK
  # Padding targets the last row (the order stays sorted) with weight 0.
  target = jnp.pad(flat[order], (0, pad), constant_values=num_rows - 1)
  source = jnp.pad(order // picks, (0, pad))
  weight = jnp.pad(weights.reshape(-1)[order], (0, pad))

  def body(chunk, dense_m):
    part = lambda a: jax.lax.dynamic_slice_in_dim(a, chunk * SORTED_CHUNK, SORTED_CHUNK)
    update = part(weight)[:, None] * rows.at[part(source)].get(mode="promise_in_bounds")
    return dense_m.at[part(target)].add(update, indices_are_sorted=True)

  dense_m = jnp.zeros((num_rows, rows.shape[-1]), jnp.float32)
  return jax.lax.fori_loop(0, target.size // SORTED_CHUNK, body, dense_m)


def gather_weighted_sum(plan: KernelPlan, weights: jax.Array, indices: jax.Array,
                        table: jax.Array) -> jax.Array:
  """out[b] = sum_j weights[b, j] * table[indices[b, j]], [B, d] float32."""
  if plan.native:
    return native.gather_weighted_sum(weights, indices, table)
  num_chunks, (indices, weights) = _chunks(indices, weights)

  def body(chunk, out):
    w, idx = _slice(weights, chunk), _slice(indices, chunk)
    for j in range(CHUNK):
      out = out + w[:, j, None] * table.at[idx[:, j]].get(mode="promise_in_bounds")
    return out

  out = jnp.zeros((indices.shape[0], table.shape[1]), jnp.float32)
  return jax.lax.fori_loop(0, num_chunks, body, out)


def gather_dot(g: jax.Array, indices: jax.Array, table: jax.Array) -> jax.Array:
  """out[b, j] = g[b] . table[indices[b, j]], [B, k] float32."""
  picks = indices.shape[1]
  num_chunks, (indices,) = _chunks(indices)

  def body(chunk, out):
    idx = _slice(indices, chunk)
    dots = [jnp.sum(g * table.at[idx[:, j]].get(mode="promise_in_bounds"), axis=1)
            for j in range(CHUNK)]
    return jax.lax.dynamic_update_slice_in_dim(out, jnp.stack(dots, axis=1), chunk * CHUNK, 1)

  out = jnp.zeros(indices.shape, jnp.float32)
  return jax.lax.fori_loop(0, num_chunks, body, out)[:, :picks]


def row_dots(plan: KernelPlan, a: jax.Array, b: jax.Array) -> jax.Array:
  """(a * b).sum(axis=1) of two [n, d] matrices.

  On CPU a row reduction is slow in XLA: the native kernel reads each pair of rows once, on all
  cores (16384 x 512: ~2.5 ms against 7.5 for XLA's batched dot). Without it, a matvec with a
  ones vector beats XLA:CPU's fused row reduction (2.4x after Adam in the train step)."""
  if plan.native:
    return native.row_dots(a, b)
  if plan.accelerator:
    return jnp.sum(a * b, axis=1)
  return (a * b) @ jnp.ones((a.shape[1],), a.dtype)


def normalize_rows(plan: KernelPlan, w: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Each row of w scaled to unit norm (rows of norm below eps are divided by eps)."""
  if plan.native:
    # One read of each row for its norm while it is in cache. XLA:CPU pulls the ops that produce
    # w (Adam, in the train step) into a fused dot for the norms, which first broadcasts each
    # of their scalars to a full [n, d] array: ~50 ms a step at 16384 x 512.
    return native.normalize_rows(w, eps)
  return w / jnp.maximum(jnp.sqrt(row_dots(plan, w, w)), eps)[:, None]
