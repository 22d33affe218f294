"""The gradient rules of the TopK SAE: a dense encoder forward, everything else over the k winners.

`sparse_encoder` computes `ReLU(W_enc (x - b_dec) + b_enc)` densely, selects the winners
(sae_jax.kernels.select), and returns only their values and indices. Its backward never
differentiates through the dense [B, n] pre-activations: it scatter-adds into the selected rows of
W_enc and b_enc (as sparsify's FusedEncoder and OpenAI's kernels do). `sparse_decode` gathers k rows
of W_dec per token; its backward scatter-adds into them. The row operations (sae_jax.kernels.rows)
take the forms the kernel plan (sae_jax.kernels.kernel_plan) chose for the devices the step is
compiled for.

The encoder takes `x` and `b_dec` separately so that, when `x` is data (no gradient asked for it),
the b_dec gradient of the centring is `-(sum_b g_pre) @ W_enc`, one [n] x [n, d] product, instead of
a per-token gather of k encoder rows (OpenAI's trick). `symbolic_zeros` tells the rule which case
it is in, and also lets it skip AuxK's backward when AuxK's outputs are unused.

The pieces are shaped for a latent-sharded version (sae_jax.kernels.sharded): selection runs per
shard, and the scatters and gathers work on shard-local indices.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from sae_jax.kernels import native, rows
from sae_jax.kernels.kernel_plan import KernelPlan
from sae_jax.kernels.select import select_top


def encoder_pre(xc: jax.Array, W_enc: jax.Array, b_enc: jax.Array,
                compute_dtype=jnp.float32) -> jax.Array:
  """Dense ReLU(xc @ W_enc^T + b_enc), [B, n] float32. The matmul runs in `compute_dtype` and
  accumulates in float32."""
  lin = jax.lax.dot_general(
      xc.astype(compute_dtype), W_enc.astype(compute_dtype), (((1,), (1,)), ((), ())),
      preferred_element_type=jnp.float32)
  return jax.nn.relu(lin + b_enc)


def jumprelu(pre: jax.Array, threshold: jax.Array) -> jax.Array:
  """The JumpReLU rule, the inference encoder of a BatchTopK dictionary: `pre` where it is above
  `threshold` (a scalar or one per latent), else 0. Training metrics and scan apply it here;
  interpret.sae.SAE applies the same rule in torch."""
  return jnp.where(pre > threshold, pre, 0.0)


@functools.lru_cache(maxsize=None)
def sparse_encoder(plan: KernelPlan, k: int, k_aux: int, method: str = "exact",
                   recall: float = 0.95, compute_dtype: str = "float32",
                   weight_grads: str = "auto"):
  """Builds f(x, b_dec, W_enc, b_enc, dead) -> (values [B,k], indices [B,k], aux_values [B,k_aux],
  aux_indices [B,k_aux]). `weight_grads`: how the backward forms the W_enc gradient
  (`rows.weight_grad_dtype`).

  The main selection is the top-k of the pre-activations. The AuxK selection (k_aux > 0) is the
  top-k_aux among latents with `dead` set; entries that are not dead (fewer than k_aux are dead)
  come back as value 0, and when nothing is dead the whole selection is skipped (zeros).
  Values are >= 0; a zero value carries no gradient (it is a ReLU at zero or a masked pick).
  """
  dtype = jnp.dtype(compute_dtype)

  def forward(x, b_dec, W_enc, b_enc, dead):
    xc = x.astype(jnp.float32) - b_dec
    pre = encoder_pre(xc, W_enc, b_enc, dtype)
    values, indices = select_top(plan, pre, k, method, recall)
    batch = x.shape[0]
    if k_aux:
      def aux_select(pre):
        # ReLU output is >= 0, so -1 ranks every live latent below every dead one.
        aux_values, aux_indices = select_top(plan, jnp.where(dead, pre, -1.0), k_aux, method,
                                             recall)
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
    matmul_dtype = rows.weight_grad_dtype(plan, weight_grads, num_latents, k, compute_dtype)
    # When x is data, the b_dec gradient of the centring is -(db_enc @ W_enc), formed along with
    # the weight gradients (the sum_table of `_weight_grads`).
    sum_table = None if x_perturbed else W_enc
    if matmul_dtype is not None:
      # One product for both selections. AuxK's d/2 picks per token join the dense matrix only
      # when a latent is dead (they are all zero otherwise).
      picked = rows.add_picks(jnp.zeros((xc.shape[0], num_latents), matmul_dtype), indices,
                              g_pre)
      if with_aux:
        picked = jax.lax.cond(any_dead, lambda p: rows.add_picks(p, aux_indices, g_aux),
                              lambda p: p, picked)
      dW_enc, db_enc = rows.picked_weight_grads(picked, xc)
      enc_sum = None if sum_table is None else db_enc @ sum_table
    else:
      grads = rows.weight_grads(plan, indices, g_pre, xc, num_latents, sum_table=sum_table)
      if with_aux:
        def add_aux(grads):
          aux = rows.weight_grads(plan, aux_indices, g_aux, xc, num_latents, sum_table=sum_table)
          return jax.tree.map(jnp.add, grads, aux)
        # Skipped at run time when nothing is dead: the aux picks are all zero then.
        grads = jax.lax.cond(any_dead, add_aux, lambda grads: grads, grads)
      dW_enc, db_enc, enc_sum = grads
    if with_aux and x_perturbed:
      g_pre = jnp.concatenate([g_pre, g_aux], axis=1)
      indices = jnp.concatenate([indices, aux_indices], axis=1)
    if x_perturbed:
      dxc = rows.gather_weighted_sum(plan, g_pre, indices, W_enc)
      dx, db_dec = dxc.astype(x_marker.dtype), -dxc.sum(0)
    else:
      dx, db_dec = None, -enc_sum
    return dx, db_dec, dW_enc, db_enc, None

  encode.defvjp(encode_fwd, encode_bwd, symbolic_zeros=True)
  return encode


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 4, 5))
def sparse_decode(plan: KernelPlan, values: jax.Array, indices: jax.Array, W_dec: jax.Array,
                  weight_grads: str = "auto", compute_dtype: str = "float32") -> jax.Array:
  """sum_j values[b, j] * W_dec[indices[b, j]], [B, d] float32 (no bias).

  A gather of k rows per token, or, where the plan takes dense products and few rows share a pick
  (AuxK's d/2 picks), a dense [B, n] x [n, d] product. The rows are read in `compute_dtype`
  (bfloat16 halves the bytes of the gathers, the forward's and the backward's), sums are float32.
  The backward forms the W_dec gradient as `rows.weight_grad_dtype(plan, weight_grads, ...)`
  says."""
  return _decode_fwd(plan, values, indices, W_dec, weight_grads, compute_dtype)[0]


def _decode_rows(plan, values, indices, table):
  if rows.dense_decode(plan, table.shape[0], indices.shape[1], table.dtype):
    picked = rows.add_picks(jnp.zeros((values.shape[0], table.shape[0]), table.dtype), indices,
                            values)
    return jnp.dot(picked, table, preferred_element_type=jnp.float32)
  return rows.gather_weighted_sum(plan, values, indices, table)


def _decode_fwd(plan, values, indices, W_dec, weight_grads, compute_dtype):
  table = W_dec.astype(compute_dtype)
  return _decode_rows(plan, values, indices, table), (values, indices, table)


def _decode_bwd(plan, weight_grads, compute_dtype, residuals, g):
  values, indices, table = residuals
  num_rows, picks = table.shape[0], indices.shape[1]
  matmul_dtype = rows.weight_grad_dtype(plan, weight_grads, num_rows, picks, compute_dtype)
  if matmul_dtype is None and plan.native:
    # Both gradients in one pass over the picks, grouped by decoder row.
    dW_dec, _, dv = native.row_grads_and_dots(indices, values, g, table)
    return dv, None, dW_dec
  dW_dec, _, _ = rows.weight_grads(plan, indices, values, g, num_rows, matmul_dtype)
  if rows.dense_decode(plan, num_rows, picks, table.dtype):
    g_all = jnp.dot(g.astype(table.dtype), table.T, preferred_element_type=jnp.float32)
    return jnp.take_along_axis(g_all, indices, axis=1), None, dW_dec
  return rows.gather_dot(g, indices, table), None, dW_dec


sparse_decode.defvjp(_decode_fwd, _decode_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 7, 8))
def decode_with_aux(plan: KernelPlan, values: jax.Array, indices: jax.Array,
                    aux_values: jax.Array, aux_indices: jax.Array, aux_on: jax.Array,
                    W_dec: jax.Array, weight_grads: str = "auto", compute_dtype: str = "float32"):
  """(sparse_decode of the top-k picks, sparse_decode of AuxK's picks), the second computed only
  when `aux_on` (zeros otherwise), forward and backward.

  One rule for both: AuxK's W_dec gradient is added to the top-k one inside the branch that
  runs when `aux_on`. With AuxK under its own `lax.cond`, every step without dead latents wrote
  an [n, d] matrix of zeros for AuxK's gradient (and another for its residuals) and added it to
  the top-k gradient: ~10 ms of a 650 ms CPU step at n = 16384, d = 512."""
  return _decode_with_aux_fwd(plan, values, indices, aux_values, aux_indices, aux_on, W_dec,
                              weight_grads, compute_dtype)[0]


def _decode_with_aux_fwd(plan, values, indices, aux_values, aux_indices, aux_on, W_dec,
                         weight_grads, compute_dtype):
  out, (_, _, table) = _decode_fwd(plan, values, indices, W_dec, weight_grads, compute_dtype)
  aux_out = jax.lax.cond(aux_on, functools.partial(_decode_rows, plan),
                         lambda *_: jnp.zeros_like(out), aux_values, aux_indices, table)
  return (out, aux_out), (values, indices, aux_values, aux_indices, aux_on, table)


def _decode_with_aux_bwd(plan, weight_grads, compute_dtype, residuals, cotangents):
  values, indices, aux_values, aux_indices, aux_on, table = residuals
  g, g_aux = cotangents
  dv, _, dW_dec = _decode_bwd(plan, weight_grads, compute_dtype, (values, indices, table), g)

  def add_aux(dW_dec):
    dv_aux, _, dW_aux = _decode_bwd(plan, weight_grads, compute_dtype,
                                    (aux_values, aux_indices, table), g_aux)
    return dv_aux, dW_dec + dW_aux

  dv_aux, dW_dec = jax.lax.cond(aux_on, add_aux, lambda dW: (jnp.zeros_like(aux_values), dW),
                                dW_dec)
  return dv, None, dv_aux, None, None, dW_dec


decode_with_aux.defvjp(_decode_with_aux_fwd, _decode_with_aux_bwd)
