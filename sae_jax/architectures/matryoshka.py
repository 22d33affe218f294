"""Matryoshka (Bussmann et al. 2025) around either selection: the latents [0, w) of each inner
width w alone must also reconstruct the input; the loss is the mean FVU over those levels and the
full dictionary.

The picks are split into groups by width (group g holds the picks of latents in [w_{g-1}, w_g)),
each group is decoded once, and level i reconstructs with the running sum of groups 0..i.
"""

from __future__ import annotations

import itertools
from typing import Callable

import jax
import jax.numpy as jnp


def group_picks(widths: tuple[int, ...], top_values: jax.Array, top_indices: jax.Array
                ) -> Callable[[int], jax.Array]:
  """picks(g): the values of group g's picks (zero elsewhere), like top_values, for g in
  [0, len(widths)]; without widths, one group, all picks."""
  group = sum((top_indices >= w).astype(jnp.int32) for w in widths)

  def picks(g: int) -> jax.Array:
    return jnp.where(group == g, top_values, 0.0) if widths else top_values

  return picks


def inner_reconstructions(decode, widths: tuple[int, ...], picks) -> list[jax.Array]:
  """Each inner level's decoded sum (without b_dec): the running sums of groups 0..i."""
  return list(itertools.accumulate(decode(picks(g)) for g in range(len(widths))))


def loss(widths: tuple[int, ...], full_fvu: jax.Array, x: jax.Array, inner: list[jax.Array],
         b_dec: jax.Array, total_variance: jax.Array) -> tuple[jax.Array, dict]:
  """(the mean FVU over the inner levels and the full dictionary, each inner level's FVU)."""
  metrics, loss = {}, full_fvu
  for width, partial in zip(widths, inner):
    name = f"fvu_prefix_{width}"
    metrics[name] = jnp.sum(jnp.square(x - partial - b_dec)) / total_variance
    loss = loss + metrics[name]
  return (loss / (len(widths) + 1) if widths else loss), metrics
