"""The grouped exact top-k against lax.top_k on one full row, ties included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sae_jax.kernels import select


@pytest.mark.parametrize("batch,num,k", [(64, 4096, 32), (33, 16384, 256), (8, 1024, 300),
                                          (5, 96, 3), (7, 100, 6)])
@pytest.mark.parametrize("data", ["relu_normal", "coarse"])
def test_grouped_top_k_equals_full_row_top_k(batch, num, k, data):
  rng = np.random.default_rng(num + k)
  if data == "relu_normal":  # about half the row ties at zero, as after the encoder's ReLU
    pre = np.maximum(rng.standard_normal((batch, num)), 0)
  else:  # the k-th value ties across groups of different maxima: which wins must match too
    pre = np.round(np.maximum(rng.standard_normal((batch, num)), 0) * 4)
  pre = jnp.asarray(pre, jnp.float32)
  want_values, want_indices = jax.lax.top_k(pre, k)
  values, indices = jax.jit(select.grouped_top_k, static_argnums=1)(pre, k)
  np.testing.assert_array_equal(values, want_values)
  np.testing.assert_array_equal(indices, want_indices)
  assert indices.dtype == jnp.int32


def test_group_size_balances_the_two_selections():
  assert select.group_size(131072, 256) == 16  # 8192 group maxima, then 4096 candidates
  assert select.group_size(16384, 32) == 16
  assert select.group_size(1024, 300) == 1  # fewer than 2k groups of 2: one plain top_k
  for num, k in [(131072, 256), (131072, 2048), (16384, 32), (96, 3)]:
    s = select.group_size(num, k)
    assert num % s == 0 and num // s >= 2 * k and s * s * k <= num
