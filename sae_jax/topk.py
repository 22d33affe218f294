"""The sparse kernels of the TopK SAE: a dense encoder forward, everything else over the k winners.

`sparse_encoder` computes `ReLU(W_enc (x - b_dec) + b_enc)` densely, selects the winners, and
returns only their values and indices. Its backward never builds the dense [B, n] cotangent: it
scatter-adds into the selected rows of W_enc and b_enc (as sparsify's FusedEncoder and OpenAI's
kernels do). `sparse_decode` gathers k rows of W_dec per token; its backward scatter-adds into them.

The encoder takes `x` and `b_dec` separately so that, when `x` is data (no gradient asked for it),
the b_dec gradient of the centring is `-(sum_b g_pre) @ W_enc`, one [n] x [n, d] product, instead of
a per-token gather of k encoder rows (OpenAI's trick). `symbolic_zeros` tells the rule which case
it is in, and also lets it skip AuxK's backward when AuxK's outputs are unused.

The pieces are shaped for a latent-sharded version (shard_map: local selection, all-gather of the
candidates, global selection, local decode, psum): `select_top` runs per shard, and the scatter and
gather helpers work on shard-local indices.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

TOPK_METHODS = ("exact", "approx")


def select_top(pre: jax.Array, k: int, method: str = "exact", recall: float = 0.95):
  """The k largest entries of each row, sorted descending: (values, int32 indices)."""
  if method == "exact":
    values, indices = jax.lax.top_k(pre, k)
  elif method == "approx":
    values, indices = jax.lax.approx_max_k(pre, k, recall_target=recall)
  else:
    raise ValueError(f"topk method {method!r}; expected one of {TOPK_METHODS}")
  # XLA:CPU lowers top_k to a full sort of the row and turns it back into its fast TopK kernel
  # only if the sort's outputs are consumed as the first-k slice alone. The barriers keep later
  # fusions from reading the sort output directly (that made a step 30x slower at k=8). One
  # barrier per array: a barrier over the tuple crashed XLA's SPMD partitioner.
  barrier = jax.lax.optimization_barrier
  return barrier(values), barrier(indices.astype(jnp.int32))


def encoder_pre(xc: jax.Array, W_enc: jax.Array, b_enc: jax.Array,
                compute_dtype=jnp.float32) -> jax.Array:
  """Dense ReLU(xc @ W_enc^T + b_enc), [B, n] float32. The matmul runs in `compute_dtype` and
  accumulates in float32."""
  lin = jax.lax.dot_general(
      xc.astype(compute_dtype), W_enc.astype(compute_dtype), (((1,), (1,)), ((), ())),
      preferred_element_type=jnp.float32)
  return jax.nn.relu(lin + b_enc)


# The O(B*k*d) work runs CHUNK picks at a time inside a loop. Done in one go, XLA materialises a
# [B, k, d] tensor (the gathered rows, or the scatter's updates), and writing that fresh buffer was
# the largest cost of the step on CPU (the gather-then-dot decoder was ~10x slower).
CHUNK = 8


def _chunks(indices: jax.Array, *per_pick: jax.Array):
  """Pads the pick axis to a multiple of CHUNK (index 0, weight 0) and returns (count, arrays)."""
  picks = indices.shape[1]
  pad = -picks % CHUNK
  padded = [jnp.pad(a, ((0, 0), (0, pad))) for a in (indices, *per_pick)]
  return (picks + pad) // CHUNK, padded


def _slice(a: jax.Array, chunk) -> jax.Array:
  return jax.lax.dynamic_slice_in_dim(a, chunk * CHUNK, CHUNK, axis=1)


def _scatter_rows(indices: jax.Array, weights: jax.Array, rows: jax.Array, num_rows: int):
  """sum over (b, j) of weights[b, j] * rows[b], added into row indices[b, j] of an [n, d] zero
  matrix, and the matching [n] sum of weights."""
  dense_w = jnp.zeros((num_rows,), jnp.float32).at[indices].add(weights)
  num_chunks, (indices, weights) = _chunks(indices, weights)

  def body(chunk, dense_m):
    w, idx = _slice(weights, chunk), _slice(indices, chunk)
    return dense_m.at[idx].add(w[..., None] * rows[:, None, :])

  dense_m = jnp.zeros((num_rows, rows.shape[-1]), jnp.float32)
  return jax.lax.fori_loop(0, num_chunks, body, dense_m), dense_w


@functools.lru_cache(maxsize=None)
def sparse_encoder(k: int, k_aux: int, method: str = "exact", recall: float = 0.95,
                   compute_dtype: str = "float32"):
  """Builds f(x, b_dec, W_enc, b_enc, dead) -> (values [B,k], indices [B,k], aux_values [B,k_aux],
  aux_indices [B,k_aux]).

  The main selection is the top-k of the pre-activations. The AuxK selection (k_aux > 0) is the
  top-k_aux among latents with `dead` set; entries that are not dead (fewer than k_aux are dead)
  come back as value 0, and when nothing is dead the whole selection is skipped (zeros).
  Values are >= 0; a zero value carries no gradient (it is a ReLU at zero or a masked pick).
  """
  dtype = jnp.dtype(compute_dtype)

  def forward(x, b_dec, W_enc, b_enc, dead):
    xc = x.astype(jnp.float32) - b_dec
    pre = encoder_pre(xc, W_enc, b_enc, dtype)
    values, indices = select_top(pre, k, method, recall)
    batch = x.shape[0]
    if k_aux:
      def aux_select(pre):
        # ReLU output is >= 0, so -1 ranks every live latent below every dead one.
        aux_values, aux_indices = select_top(jnp.where(dead, pre, -1.0), k_aux, method, recall)
        return jnp.maximum(aux_values, 0.0), aux_indices
      aux_values, aux_indices = jax.lax.cond(
          jnp.any(dead), aux_select,
          lambda _: (jnp.zeros((batch, k_aux), jnp.float32), jnp.zeros((batch, k_aux), jnp.int32)),
          pre)
    else:
      aux_values = jnp.zeros((batch, 0), jnp.float32)
      aux_indices = jnp.zeros((batch, 0), jnp.int32)
    return (values, indices, aux_values, aux_indices), xc

  @jax.custom_vjp
  def encode(x, b_dec, W_enc, b_enc, dead):
    return forward(x, b_dec, W_enc, b_enc, dead)[0]

  def encode_fwd(x, b_dec, W_enc, b_enc, dead):
    outs, xc = forward(x.value, b_dec.value, W_enc.value, b_enc.value, dead.value)
    values, indices, aux_values, aux_indices = outs
    # Residuals must be arrays or pytree structure: whether x wants a gradient is kept as the
    # presence (or None) of an empty marker, which also carries x's dtype.
    x_marker = jnp.zeros((0,), x.value.dtype) if x.perturbed else None
    residuals = (xc, W_enc.value, values, indices, aux_values, aux_indices, x_marker,
                 jnp.any(dead.value))
    return outs, residuals

  def encode_bwd(residuals, cotangents):
    xc, W_enc, values, indices, aux_values, aux_indices, x_marker, any_dead = residuals
    x_perturbed = x_marker is not None
    g_values, _, g_aux, _ = cotangents
    num_latents = W_enc.shape[0]

    def pre_grads(g, v, idx):
      # d/d(pre) through the ReLU: nothing flows into picks whose value is zero.
      g = jnp.where(v > 0, g, 0.0)
      return _scatter_rows(idx, g, xc, num_latents), g

    if isinstance(g_values, SymbolicZero):
      g_values = jnp.zeros_like(values)
    (dW_enc, db_enc), g_pre = pre_grads(g_values, values, indices)
    if k_aux and not isinstance(g_aux, SymbolicZero):
      def aux_grads(operands):
        dW_enc, db_enc = operands
        (dW_aux, db_aux), _ = pre_grads(g_aux, aux_values, aux_indices)
        return dW_enc + dW_aux, db_enc + db_aux
      # Skipped at run time when nothing is dead: the aux picks are all zero then.
      dW_enc, db_enc = jax.lax.cond(any_dead, aux_grads, lambda o: o, (dW_enc, db_enc))
      if x_perturbed:
        g_pre = jnp.concatenate([g_pre, jnp.where(aux_values > 0, g_aux, 0.0)], axis=1)
        indices = jnp.concatenate([indices, aux_indices], axis=1)
    if x_perturbed:
      dxc = gather_weighted_sum(g_pre, indices, W_enc)
      dx, db_dec = dxc.astype(x_marker.dtype), -dxc.sum(0)
    else:
      dx, db_dec = None, -(db_enc @ W_enc)
    return dx, db_dec, dW_enc, db_enc, None

  encode.defvjp(encode_fwd, encode_bwd, symbolic_zeros=True)
  return encode


def gather_weighted_sum(weights: jax.Array, indices: jax.Array, table: jax.Array) -> jax.Array:
  """out[b] = sum_j weights[b, j] * table[indices[b, j]], [B, d] float32."""
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


@jax.custom_vjp
def sparse_decode(values: jax.Array, indices: jax.Array, W_dec: jax.Array) -> jax.Array:
  """sum_j values[b, j] * W_dec[indices[b, j]], [B, d] float32 (no bias). A gather of k rows per
  token, never a dense [B, n] @ [n, d]."""
  return gather_weighted_sum(values, indices, W_dec)


def _decode_fwd(values, indices, W_dec):
  return sparse_decode(values, indices, W_dec), (values, indices, W_dec)


def _decode_bwd(residuals, g):
  values, indices, W_dec = residuals
  dW_dec, _ = _scatter_rows(indices, values, g, W_dec.shape[0])
  return gather_dot(g, indices, W_dec), None, dW_dec


sparse_decode.defvjp(_decode_fwd, _decode_bwd)
