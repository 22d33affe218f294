"""Selection: the k largest pre-activations of each row, as the kernel plan says to compute them."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sae_jax.kernels.kernel_plan import KernelPlan

TOPK_METHODS = ("exact", "approx")


def select_top(plan: KernelPlan, pre: jax.Array, k: int, method: str = "exact",
               recall: float = 0.95):
  """The k largest entries of each row, sorted descending: (values, int32 indices)."""
  if method == "exact":
    # On XLA:CPU the grouped selection lost inside the step (its group maxima cost more than the
    # TopK kernel's scan, fused after the encoder matmul), so the CPU keeps the plain top_k.
    return grouped_top_k(pre, k) if plan.grouped_topk else _barrier(*jax.lax.top_k(pre, k))
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
