"""Which kernels a compiled program uses, chosen once from the devices it is compiled for.

A step compiled ahead of time for a TPU topology on a CPU host must take the TPU's kernels, and a
real run on that TPU the same ones; so the process's default backend is never consulted. The plan
is a static attribute of the model (part of its graphdef) and reaches every kernel from there.
"""

from __future__ import annotations

import dataclasses

from sae_jax.kernels import native


@dataclasses.dataclass(frozen=True)
class KernelPlan:
  platform: str  # "cpu", "gpu" or "tpu": the devices' platform
  # The row gathers, scatters and reductions as sae_jax.kernels.native's hand-written CPU kernels.
  native: bool
  # The exact top-k as two narrow selections (select.grouped_top_k): a top_k of large k sorts the
  # whole row on accelerators; XLA:CPU's TopK kernel is faster alone.
  grouped_topk: bool
  # Dense [B, n] products instead of row scatters and gathers where few rows share a pick
  # (rows.MAX_ROWS_PER_PICK): the weight gradients under weight_grads="auto" and AuxK's decode.
  dense_products: bool

  @property
  def accelerator(self) -> bool:
    return self.platform != "cpu"

  @classmethod
  def for_platform(cls, platform: str, *, use_native: bool = True) -> KernelPlan:
    accelerator = platform != "cpu"
    return cls(platform=platform, native=not accelerator and use_native and native.available(),
               grouped_topk=accelerator, dense_products=accelerator)

  @classmethod
  def for_devices(cls, devices) -> KernelPlan:
    platforms = {d.platform for d in devices}
    if len(platforms) != 1:
      raise ValueError(f"a program for devices of several platforms {sorted(platforms)}")
    return cls.for_platform(platforms.pop())

  def to_json(self) -> dict:
    return dataclasses.asdict(self)
