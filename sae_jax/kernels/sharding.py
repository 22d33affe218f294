"""The device mesh ("data", "model") and where each piece of the training state lives on it."""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

AXES = ("data", "model")


def parse_mesh(spec: str, num_devices: int) -> dict[str, int]:
  """Parses "data:-1,model:2" into axis sizes; one -1 fills the devices left over."""
  sizes = {}
  for part in spec.split(","):
    name, _, size = part.partition(":")
    name = name.strip()
    if name not in AXES or not size.strip().lstrip("-").isdigit():
      raise ValueError(f"--mesh={spec!r}: expected 'data:N,model:M' with axes {AXES}, N or M -1")
    sizes[name] = int(size)
  sizes = {axis: sizes.get(axis, 1) for axis in AXES}
  fill = [a for a, s in sizes.items() if s == -1]
  if len(fill) > 1:
    raise ValueError(f"--mesh={spec!r}: only one axis may be -1")
  known = math.prod(s for s in sizes.values() if s != -1)
  if fill:
    if num_devices % known:
      raise ValueError(f"--mesh={spec!r}: {num_devices} devices do not divide by {known}")
    sizes[fill[0]] = num_devices // known
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(f"--mesh={spec!r} needs {math.prod(sizes.values())} devices, "
                     f"but {num_devices} are available")
  return sizes


def make_mesh(spec: str, devices=None) -> jax.sharding.Mesh:
  devices = jax.devices() if devices is None else devices
  sizes = parse_mesh(spec, len(devices))
  # Auto axes: XLA propagates shardings through the dense parts of the step. The latent top-k is
  # never left to it (it would all-gather [batch, n]); that goes through shard_map.
  return jax.make_mesh(tuple(sizes[a] for a in AXES), AXES, devices=devices,
                       axis_types=(AxisType.Auto,) * len(AXES))


def state_shardings(abstract_state, mesh: jax.sharding.Mesh):
  """The shardings the state's variables name in their metadata (model.LATENT_ROWS: W_enc, W_dec,
  b_enc, the dead-latent counters, and the Adam moments that inherit it, split over "model");
  the rest replicated."""
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec),
                      nnx.get_partition_spec(abstract_state))


def with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs that carry their target shardings (restores and ahead-of-time compiles)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_tree, shardings)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P("data", None))


def global_batch(local_rows: np.ndarray, mesh: jax.sharding.Mesh) -> jax.Array:
  """Assembles the global [batch, d] array from each process's rows."""
  return jax.make_array_from_process_local_data(batch_sharding(mesh), local_rows)
