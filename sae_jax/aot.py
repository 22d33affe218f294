"""Plans a pod-scale run without the pod: the full training step compiled ahead of time.

`plan` lowers and compiles the trainer's own jitted step (sae_jax.training.programs.jit_update, on
batches of the store's dtype, as a run serves them) for a mesh of devices from abstract inputs
(shapes, dtypes and shardings only: nothing is allocated), with the kernel plan of those devices,
then reads the compiler's memory and cost analyses of the per-device program and lists the
collectives it contains. The devices are a virtual CPU mesh (`jax_num_cpu_devices`, set before JAX
starts its backend) or a TPU topology (`tpu_devices`: libtpu's compiler, no TPU needed).
"""

from __future__ import annotations

import collections
import importlib.util
import math
import os
import re

import jax
import jax.numpy as jnp

from sae_jax import data
from sae_jax.kernels import sharding
from sae_jax.training import programs, step
from sae_jax.kernels.kernel_plan import KernelPlan
from sae_jax.config import SAEConfig
from sae_jax.store import disk_width

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
# One HLO instruction with a collective's result, e.g. "%x = f32[1024,64]{1,0} all-gather(" or,
# asynchronous, "... = (f32[8,4]{1,0}, s32[8,4]{1,0}) all-gather-done(". The "-start" half of an
# asynchronous pair is skipped: its "-done" holds the result.
_COLLECTIVE = re.compile(r"^\s*(?:ROOT )?%?\S+ = (.*?) (" + "|".join(COLLECTIVES) +
                         r")(-start|-done)?\(", re.MULTILINE)
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
             "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}


class TopologyError(Exception):
  """A TPU topology that cannot be planned here (libtpu missing, a name it does not know)."""


def tpu_devices(topology: str):
  """The devices of a TPU slice, e.g. "v5e:2x4", from libtpu's compiler (no TPU needed)."""
  if importlib.util.find_spec("libtpu") is None:
    raise TopologyError(f"--aot_topology={topology} compiles with libtpu, which is not "
                        "installed: pip install -e \".[tpu]\"")
  # Off a TPU VM: no metadata server to ask (MaxText's train_compile.py does the same).
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  from jax.experimental import topologies
  # v4 and v5p chips have two cores that JAX drives as one device ("megacore", as on the real
  # chips and in MaxText's train_compile.py); libtpu's default config lists each core.
  chip = {"chip_config_name": "megacore"} if topology.startswith(("v4", "v5p")) else {}
  try:
    return topologies.get_topology_desc(platform="tpu", topology_name=topology, **chip).devices
  except Exception as e:  # libtpu's errors carry no common type
    raise TopologyError(f"--aot_topology={topology}: {str(e).splitlines()[0]}") from e


def per_device_bytes(abstract_tree) -> int:
  """Bytes that one device holds of a tree of ShapeDtypeStructs carrying shardings."""
  return sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
             for a in jax.tree.leaves(abstract_tree))


def collectives(hlo: str) -> tuple[dict[str, int], int]:
  """({"op result-shapes": count}, total bytes of their results) of a compiled HLO module. Every
  instruction counts once: both branches of a conditional (an upper bound of a step)."""
  counts, total = collections.Counter(), 0
  for result, op, phase in _COLLECTIVE.findall(hlo):
    if phase == "-start":
      continue
    arrays = _ARRAY.findall(result)
    counts[f"{op} {' '.join(f'{t}[{s}]' for t, s in arrays)}"] += 1
    total += sum(_ITEMSIZE.get(t, 4) * math.prod(int(n) for n in s.split(",") if n)
                 for t, s in arrays)
  return dict(sorted(counts.items())), total


def plan(cfg: SAEConfig, mesh: jax.sharding.Mesh, batch_size: int, store_dtype: str) -> dict:
  kernel_plan = KernelPlan.for_devices(mesh.devices.flat)
  tx = step.make_optimizer(step.default_learning_rate(cfg.num_latents))
  graphdef_box = []

  def init():
    graphdef, state = step.create_state(cfg, tx, seed=0, b_dec=None, plan=kernel_plan)
    graphdef_box.append(graphdef)
    return state

  with jax.set_mesh(mesh):
    abstract = jax.eval_shape(init)
    shardings = sharding.state_shardings(abstract, mesh)
    state = sharding.with_shardings(abstract, shardings)
    x = jax.ShapeDtypeStruct((batch_size, disk_width(store_dtype, cfg.d_in)),
                             jnp.dtype(data.batch_dtype(store_dtype)),
                             sharding=sharding.batch_sharding(mesh))
    # The input scale is a constant of the program: any value compiles the same operations.
    update = programs.jit_update(graphdef_box[0], 1.0, store_dtype, shardings, mesh)
    compiled = update.lower(state, x).compile()
  memory = compiled.memory_analysis()
  hlo = compiled.as_text()
  counts, collective_bytes = collectives(hlo)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  gib = 2**30
  device = mesh.devices.flat[0]
  return {
      "platform": device.platform, "device_kind": device.device_kind,
      "mesh": dict(mesh.shape), "devices": mesh.size, "kernel_plan": kernel_plan.to_json(),
      "program": re.match(r"HloModule (\S+?),", hlo).group(1),  # the trainer's: jit_scaled_step
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
      "collectives": counts,
      "collective_gib_per_step": collective_bytes / gib,
      # Per-operand entries ("bytes accessed0{}") left out: the totals are what plans compare.
      "cost_analysis": {k: v for k, v in (cost or {}).items() if "{" not in k},
  }
