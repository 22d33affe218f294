"""The jitted programs the trainer runs on each batch, shared with the AOT planner (sae_jax.aot),
so that a plan compiles the very program a run executes: the step on rows as the store holds them.
"""

from __future__ import annotations

import jax
from flax import nnx

from sae_jax import data
from sae_jax.kernels import sharding
from sae_jax.training.step import eval_metrics, train_step


def jit_update(graphdef: nnx.GraphDef, input_scale: float, store_dtype: str, state_sharding,
               mesh: jax.sharding.Mesh):
  """The update step: jitted once, state donated so it is updated in place."""
  def scaled_step(state, x):  # x as stored: 16-bit or fp8 rows cross to the device as such
    return train_step(graphdef, state, data.device_rows(x, store_dtype) * input_scale)

  return jax.jit(scaled_step, in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
                 out_shardings=(state_sharding, None), donate_argnums=0)


def jit_inference(graphdef: nnx.GraphDef, input_scale: float, store_dtype: str, state_sharding,
                  mesh: jax.sharding.Mesh):
  return jax.jit(lambda state, x: eval_metrics(graphdef, state,
                                               data.device_rows(x, store_dtype) * input_scale),
                 in_shardings=(state_sharding, sharding.batch_sharding(mesh)))
