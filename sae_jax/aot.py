"""Plans a pod-scale run without the pod: the full training step compiled ahead of time.

`plan` lowers and compiles `train_step` for a mesh of devices from abstract inputs (shapes,
dtypes and shardings only: nothing is allocated), then reads XLA's memory analysis of the
compiled per-device program and lists the collectives it contains. On CPU, a virtual mesh of N
devices comes from `jax.config.update("jax_num_cpu_devices", N)` before JAX starts its backend.
"""

from __future__ import annotations

import collections
import functools
import math
import re

import jax
import jax.numpy as jnp

from sae_jax import sharding, step
from sae_jax.model import SAEConfig

# An HLO collective and the shape of its result, e.g. "f32[1024,1024]{1,0} all-gather(".
_COLLECTIVE = re.compile(r"(\w+\[[\d,]*\])(?:\{[^}]*\})?\s+(all-gather|all-reduce|reduce-scatter|"
                         r"all-to-all|collective-permute)(?:-start)?\(")


def per_device_bytes(abstract_tree) -> int:
  """Bytes that one device holds of a tree of ShapeDtypeStructs carrying shardings."""
  return sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
             for a in jax.tree.leaves(abstract_tree))


def plan(cfg: SAEConfig, mesh: jax.sharding.Mesh, batch_size: int) -> dict:
  tx = step.make_optimizer(step.default_learning_rate(cfg.num_latents))
  graphdef_box = []

  def init():
    graphdef, state = step.create_state(cfg, tx, seed=0, b_dec=None)
    graphdef_box.append(graphdef)
    return state

  with jax.set_mesh(mesh):
    abstract = jax.eval_shape(init)
    shardings = sharding.state_shardings(abstract, mesh, cfg.num_latents)
    state = sharding.with_shardings(abstract, shardings)
    x = jax.ShapeDtypeStruct((batch_size, cfg.d_in), jnp.float32,
                             sharding=sharding.batch_sharding(mesh))
    update = jax.jit(functools.partial(step.train_step, graphdef_box[0]),
                     in_shardings=(shardings, sharding.batch_sharding(mesh)),
                     out_shardings=(shardings, None), donate_argnums=0)
    compiled = update.lower(state, x).compile()
  memory = compiled.memory_analysis()
  collectives = collections.Counter(
      f"{op} {shape}" for shape, op in _COLLECTIVE.findall(compiled.as_text()))
  gib = 2**30
  return {
      "mesh": dict(mesh.shape), "devices": mesh.size,
      "per_device_gib": {
          "parameters_and_counters": per_device_bytes(state[0]) / gib,
          "optimizer_state": per_device_bytes(state[1]) / gib,
          "batch": per_device_bytes(x) / gib,
          "xla_arguments": memory.argument_size_in_bytes / gib,
          "xla_outputs": memory.output_size_in_bytes / gib,
          "xla_aliased": memory.alias_size_in_bytes / gib,
          "xla_temporaries": memory.temp_size_in_bytes / gib,
          # Donated state is aliased into the outputs, so it is counted once.
          "xla_peak_estimate": (memory.argument_size_in_bytes + memory.output_size_in_bytes
                                - memory.alias_size_in_bytes + memory.temp_size_in_bytes) / gib,
      },
      "collectives": dict(sorted(collectives.items())),
  }
