"""The sparse kernels of the TopK SAE: a dense encoder forward, everything else over the k winners.

`sparse_encoder` computes `ReLU(W_enc (x - b_dec) + b_enc)` densely, selects the winners, and
returns only their values and indices. Its backward never differentiates through the dense
[B, n] pre-activations: it scatter-adds into the selected rows of W_enc and b_enc (as sparsify's
FusedEncoder and OpenAI's kernels do). `sparse_decode` gathers k rows of W_dec per token; its
backward scatter-adds into them.

On a GPU or TPU, matmuls are so much faster than scatters and gathers that, with few latents per
pick, some of these become dense products over a [B, n] matrix holding only the picks: the weight
gradients (`weight_grad_dtype`) and AuxK's decode (`MAX_ROWS_PER_PICK`, measured on an H100).
The exact top-k takes a grouped form there (`grouped_top_k`). On CPU the gathers and scatters run as
hand-written kernels (`sae_jax.native`) when they could be built, and as the XLA forms below when
not.

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

from sae_jax import native

TOPK_METHODS = ("exact", "approx")


def on_accelerator() -> bool:
  """Whether jit compiles for a GPU or TPU, where some kernels take dense or grouped forms."""
  return jax.default_backend() != "cpu"


def native_kernels() -> bool:
  """Whether the row gathers and scatters run as sae_jax.native's hand-written CPU kernels."""
  return not on_accelerator() and native.available()


def select_top(pre: jax.Array, k: int, method: str = "exact", recall: float = 0.95):
  """The k largest entries of each row, sorted descending: (values, int32 indices)."""
  if method == "exact":
    # On XLA:CPU the grouped selection lost inside the step (its group maxima cost more than the
    # TopK kernel's scan, fused after the encoder matmul), so the CPU keeps the plain top_k.
    return grouped_top_k(pre, k) if on_accelerator() else _barrier(*jax.lax.top_k(pre, k))
  if method == "approx":
    return _barrier(*jax.lax.approx_max_k(pre, k, recall_target=recall))
  raise ValueError(f"topk method {method!r}; expected one of {TOPK_METHODS}")


def _barrier(values, indices):
  # XLA:CPU lowers top_k to a full sort of the row and turns it back into its fast TopK kernel
  # only if the sort's outputs are consumed as the first-k slice alone. The barriers keep later
  # fusions from reading the sort output directly (that made a step 30x slower at k=8). One
  # barrier per array: a barrier over the tuple crashed XLA's SPMD partitioner.
  barrier = jax.lax.optimization_barrier
  return barrier(values), barrier(indices.astype(jnp.int32))


def group_size(num: int, k: int) -> int:
  """Width of the contiguous groups `grouped_top_k` splits a row of `num` into: the largest power
  of two up to sqrt(num / k), where the two selections' widths num/s + k*s are smallest; 1 (no
  grouping) when no such s >= 2 divides the row into at least 2k groups."""
  s = 1
  while num % (2 * s) == 0 and num // (2 * s) >= 2 * k and (2 * s) ** 2 * k <= num:
    s *= 2
  return s


def grouped_top_k(pre: jax.Array, k: int):
  """`lax.top_k` of each row, same values, same indices (ties to the lower index), computed as
  two narrow selections: the k contiguous groups of `group_size` with the largest maxima, then
  the top k among those groups' entries.

  Exact: every top-k entry lies in a group whose maximum is at least the k-th value, and at most
  k groups can hold a top-k entry ahead of it in (value, index) order, so the k best groups (ties
  to the lower group) hold them all; re-sorting the chosen groups by position keeps top_k's
  tie-breaking. GPUs sort a top_k of large k over the whole row (37 ms of a 44 ms floor at the
  paper's size on an H100): two selections over n/s and k*s entries cost much less
  (docs/benchmarks.md).
  """
  batch, num = pre.shape
  s = group_size(num, k)
  if s == 1:
    return _barrier(*jax.lax.top_k(pre, k))
  groups = pre.reshape(batch, num // s, s)
  _, best = _barrier(*jax.lax.top_k(groups.max(axis=2), k))
  best = jnp.sort(best, axis=1)
  candidates = jnp.take_along_axis(groups, best[:, :, None], axis=1).reshape(batch, k * s)
  values, position = _barrier(*jax.lax.top_k(candidates, k))
  indices = jnp.take_along_axis(best, position // s, axis=1) * s + position % s
  return values, indices


def encoder_pre(xc: jax.Array, W_enc: jax.Array, b_enc: jax.Array,
                compute_dtype=jnp.float32) -> jax.Array:
  """Dense ReLU(xc @ W_enc^T + b_enc), [B, n] float32. The matmul runs in `compute_dtype` and
  accumulates in float32."""
  lin = jax.lax.dot_general(
      xc.astype(compute_dtype), W_enc.astype(compute_dtype), (((1,), (1,)), ((), ())),
      preferred_element_type=jnp.float32)
  return jax.nn.relu(lin + b_enc)


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


def weight_grad_dtype(mode: str, num_rows: int, picks: int, compute_dtype: str):
  """The operand dtype of the dense weight-gradient matmul, or None for the sparse scatter."""
  if mode not in WEIGHT_GRADS:
    raise ValueError(f"weight_grads={mode!r}; expected one of {WEIGHT_GRADS}")
  if mode == "auto":
    limit = MAX_ROWS_PER_PICK[jnp.dtype(compute_dtype).name][0]
    mode = "matmul" if on_accelerator() and num_rows <= limit * picks else "scatter"
  return jnp.dtype(compute_dtype) if mode == "matmul" else None


def add_picks(dense: jax.Array, indices: jax.Array, weights: jax.Array) -> jax.Array:
  """dense [B, n] plus weights[b, j] at (b, indices[b, j])."""
  rows = jnp.arange(dense.shape[0])[:, None]
  return dense.at[rows, indices].add(weights.astype(dense.dtype))


def _picked_weight_grads(picked: jax.Array, rows: jax.Array):
  """(picked^T rows [n, d], picked's column sums [n]), float32, from a dense [B, n] pick matrix:
  the backward of a dense layer, one matmul in picked's dtype."""
  dense_m = jax.lax.dot_general(picked, rows.astype(picked.dtype), (((0,), (0,)), ((), ())),
                                preferred_element_type=jnp.float32)
  return dense_m, jnp.sum(picked, axis=0, dtype=jnp.float32)


def _weight_grads(indices: jax.Array, weights: jax.Array, rows: jax.Array, num_rows: int,
                  matmul_dtype=None, sum_table: jax.Array | None = None):
  """sum over (b, j) of weights[b, j] * rows[b], added into row indices[b, j] of an [n, d] zero
  matrix, the matching [n] sum of weights, and, given an [n, d] sum_table, that sum @ sum_table
  (else None).

  With `matmul_dtype`: `_picked_weight_grads` of the picks made dense. Otherwise a scatter-add of
  the B*k weighted rows: on CPU `native.row_grads` or, without it, in target-row order
  (`_sorted_row_scatter`); on an accelerator CHUNK picks at a time."""
  if matmul_dtype is not None:
    picked = add_picks(jnp.zeros((indices.shape[0], num_rows), matmul_dtype), indices, weights)
    dense_m, dense_w = _picked_weight_grads(picked, rows)
  elif native_kernels():
    return native.row_grads(indices, weights, rows, num_rows, sum_table)
  else:
    dense_w = jnp.zeros((num_rows,), jnp.float32).at[indices].add(weights)
    dense_m = (_sorted_row_scatter(indices, weights, rows, num_rows) if not on_accelerator()
               else _chunked_row_scatter(indices, weights, rows, num_rows))
  return dense_m, dense_w, None if sum_table is None else dense_w @ sum_table


def _chunked_row_scatter(indices: jax.Array, weights: jax.Array, rows: jax.Array, num_rows: int):
  """The [n, d] part of `_weight_grads` on an accelerator, CHUNK picks per scatter."""
  num_chunks, (indices, weights) = _chunks(indices, weights)

  def body(chunk, dense_m):
    w, idx = _slice(weights, chunk), _slice(indices, chunk)
    return dense_m.at[idx].add(w[..., None] * rows[:, None, :])

  dense_m = jnp.zeros((num_rows, rows.shape[-1]), jnp.float32)
  return jax.lax.fori_loop(0, num_chunks, body, dense_m)


# Picks per scatter of `_sorted_row_scatter`: 2048 ran fastest of 1024 to 8192 at d=512.
SORTED_CHUNK = 2048


def _sorted_row_scatter(indices: jax.Array, weights: jax.Array, rows: jax.Array, num_rows: int):
  """The [n, d] part of `_weight_grads`, with the B*k picks sorted by target row first.

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


@functools.lru_cache(maxsize=None)
def sparse_encoder(k: int, k_aux: int, method: str = "exact", recall: float = 0.95,
                   compute_dtype: str = "float32", weight_grads: str = "auto"):
  """Builds f(x, b_dec, W_enc, b_enc, dead) -> (values [B,k], indices [B,k], aux_values [B,k_aux],
  aux_indices [B,k_aux]). `weight_grads`: how the backward forms the W_enc gradient
  (`weight_grad_dtype`).

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

    # d/d(pre) through the ReLU: nothing flows into picks whose value is zero.
    if isinstance(g_values, SymbolicZero):
      g_values = jnp.zeros_like(values)
    g_pre = jnp.where(values > 0, g_values, 0.0)
    with_aux = k_aux and not isinstance(g_aux, SymbolicZero)
    if with_aux:
      g_aux = jnp.where(aux_values > 0, g_aux, 0.0)
    matmul_dtype = weight_grad_dtype(weight_grads, num_latents, k, compute_dtype)
    # When x is data, the b_dec gradient of the centring is -(db_enc @ W_enc), formed along with
    # the weight gradients (the sum_table of `_weight_grads`).
    sum_table = None if x_perturbed else W_enc
    if matmul_dtype is not None:
      # One product for both selections. AuxK's d/2 picks per token join the dense matrix only
      # when a latent is dead (they are all zero otherwise).
      picked = add_picks(jnp.zeros((xc.shape[0], num_latents), matmul_dtype), indices, g_pre)
      if with_aux:
        picked = jax.lax.cond(any_dead, lambda p: add_picks(p, aux_indices, g_aux), lambda p: p,
                              picked)
      dW_enc, db_enc = _picked_weight_grads(picked, xc)
      enc_sum = None if sum_table is None else db_enc @ sum_table
    else:
      grads = _weight_grads(indices, g_pre, xc, num_latents, sum_table=sum_table)
      if with_aux:
        def add_aux(grads):
          aux = _weight_grads(aux_indices, g_aux, xc, num_latents, sum_table=sum_table)
          return jax.tree.map(jnp.add, grads, aux)
        # Skipped at run time when nothing is dead: the aux picks are all zero then.
        grads = jax.lax.cond(any_dead, add_aux, lambda grads: grads, grads)
      dW_enc, db_enc, enc_sum = grads
    if with_aux and x_perturbed:
      g_pre = jnp.concatenate([g_pre, g_aux], axis=1)
      indices = jnp.concatenate([indices, aux_indices], axis=1)
    if x_perturbed:
      dxc = gather_weighted_sum(g_pre, indices, W_enc)
      dx, db_dec = dxc.astype(x_marker.dtype), -dxc.sum(0)
    else:
      dx, db_dec = None, -enc_sum
    return dx, db_dec, dW_enc, db_enc, None

  encode.defvjp(encode_fwd, encode_bwd, symbolic_zeros=True)
  return encode


def gather_weighted_sum(weights: jax.Array, indices: jax.Array, table: jax.Array) -> jax.Array:
  """out[b] = sum_j weights[b, j] * table[indices[b, j]], [B, d] float32."""
  if native_kernels():
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


def row_dots(a: jax.Array, b: jax.Array) -> jax.Array:
  """(a * b).sum(axis=1) of two [n, d] matrices.

  On CPU a row reduction is slow in XLA: the native kernel reads each pair of rows once, on all
  cores (16384 x 512: ~2.5 ms against 7.5 for XLA's batched dot). Without it, a matvec with a
  ones vector beats XLA:CPU's fused row reduction (2.4x after Adam in the train step)."""
  if native_kernels():
    return native.row_dots(a, b)
  if on_accelerator():
    return jnp.sum(a * b, axis=1)
  return (a * b) @ jnp.ones((a.shape[1],), a.dtype)


def normalize_rows(w: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Each row of w scaled to unit norm (rows of norm below eps are divided by eps)."""
  if native_kernels():
    # One read of each row for its norm while it is in cache. XLA:CPU pulls the ops that produce
    # w (Adam, in the train step) into a fused dot for the norms, which first broadcasts each
    # of their scalars to a full [n, d] array: ~50 ms a step at 16384 x 512.
    return native.normalize_rows(w, eps)
  return w / jnp.maximum(jnp.sqrt(row_dots(w, w)), eps)[:, None]


def _dense_decode(num_rows: int, picks: int, compute_dtype) -> bool:
  limit = MAX_ROWS_PER_PICK[jnp.dtype(compute_dtype).name][1]
  return on_accelerator() and num_rows <= limit * picks


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def sparse_decode(values: jax.Array, indices: jax.Array, W_dec: jax.Array,
                  weight_grads: str = "auto", compute_dtype: str = "float32") -> jax.Array:
  """sum_j values[b, j] * W_dec[indices[b, j]], [B, d] float32 (no bias).

  A gather of k rows per token, or, on an accelerator with few rows per pick (AuxK's d/2 picks),
  a dense [B, n] x [n, d] product. The rows are read in `compute_dtype` (bfloat16 halves the
  bytes of the gathers, the forward's and the backward's), sums are float32. The backward forms
  the W_dec gradient as `weight_grad_dtype(weight_grads, ...)` says."""
  return _decode_fwd(values, indices, W_dec, weight_grads, compute_dtype)[0]


def _decode_rows(values, indices, table):
  if _dense_decode(table.shape[0], indices.shape[1], table.dtype):
    picked = add_picks(jnp.zeros((values.shape[0], table.shape[0]), table.dtype), indices, values)
    return jnp.dot(picked, table, preferred_element_type=jnp.float32)
  return gather_weighted_sum(values, indices, table)


def _decode_fwd(values, indices, W_dec, weight_grads, compute_dtype):
  table = W_dec.astype(compute_dtype)
  return _decode_rows(values, indices, table), (values, indices, table)


def _decode_bwd(weight_grads, compute_dtype, residuals, g):
  values, indices, table = residuals
  num_rows, picks = table.shape[0], indices.shape[1]
  matmul_dtype = weight_grad_dtype(weight_grads, num_rows, picks, compute_dtype)
  if matmul_dtype is None and native_kernels():
    # Both gradients in one pass over the picks, grouped by decoder row.
    dW_dec, _, dv = native.row_grads_and_dots(indices, values, g, table)
    return dv, None, dW_dec
  dW_dec, _, _ = _weight_grads(indices, values, g, num_rows, matmul_dtype)
  if _dense_decode(num_rows, picks, table.dtype):
    g_all = jnp.dot(g.astype(table.dtype), table.T, preferred_element_type=jnp.float32)
    return jnp.take_along_axis(g_all, indices, axis=1), None, dW_dec
  return gather_dot(g, indices, table), None, dW_dec


sparse_decode.defvjp(_decode_fwd, _decode_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def decode_with_aux(values: jax.Array, indices: jax.Array, aux_values: jax.Array,
                    aux_indices: jax.Array, aux_on: jax.Array, W_dec: jax.Array,
                    weight_grads: str = "auto", compute_dtype: str = "float32"):
  """(sparse_decode of the top-k picks, sparse_decode of AuxK's picks), the second computed only
  when `aux_on` (zeros otherwise), forward and backward.

  One rule for both: AuxK's W_dec gradient is added to the top-k one inside the branch that
  runs when `aux_on`. With AuxK under its own `lax.cond`, every step without dead latents wrote
  an [n, d] matrix of zeros for AuxK's gradient (and another for its residuals) and added it to
  the top-k gradient: ~10 ms of a 650 ms CPU step at n = 16384, d = 512."""
  return _decode_with_aux_fwd(values, indices, aux_values, aux_indices, aux_on, W_dec,
                              weight_grads, compute_dtype)[0]


def _decode_with_aux_fwd(values, indices, aux_values, aux_indices, aux_on, W_dec, weight_grads,
                         compute_dtype):
  out, (_, _, table) = _decode_fwd(values, indices, W_dec, weight_grads, compute_dtype)
  aux_out = jax.lax.cond(aux_on, _decode_rows, lambda *_: jnp.zeros_like(out),
                         aux_values, aux_indices, table)
  return (out, aux_out), (values, indices, aux_values, aux_indices, aux_on, table)


def _decode_with_aux_bwd(weight_grads, compute_dtype, residuals, cotangents):
  values, indices, aux_values, aux_indices, aux_on, table = residuals
  g, g_aux = cotangents
  dv, _, dW_dec = _decode_bwd(weight_grads, compute_dtype, (values, indices, table), g)

  def add_aux(dW_dec):
    dv_aux, _, dW_aux = _decode_bwd(weight_grads, compute_dtype,
                                    (aux_values, aux_indices, table), g_aux)
    return dv_aux, dW_dec + dW_aux

  dv_aux, dW_dec = jax.lax.cond(aux_on, add_aux, lambda dW: (jnp.zeros_like(aux_values), dW),
                                dW_dec)
  return dv, None, dv_aux, None, None, dW_dec


decode_with_aux.defvjp(_decode_with_aux_fwd, _decode_with_aux_bwd)
