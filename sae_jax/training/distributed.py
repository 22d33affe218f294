"""Multi-host start-up: `jax.distributed.initialize` from flags, or auto-detected on pods/SLURM."""

from __future__ import annotations

import os

import jax
from absl import logging


def in_multihost_cluster() -> bool:
  """True on a multi-host TPU slice or inside a multi-task SLURM job (JAX detects both itself)."""
  tpu_hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  slurm_tasks = int(os.environ.get("SLURM_NTASKS", "1") or 1)
  return "," in tpu_hosts or (slurm_tasks > 1 and "SLURM_JOB_ID" in os.environ)


def initialize(mode: str, coordinator_address: str | None, num_processes: int | None,
               process_id: int | None) -> None:
  """Joins the processes of one training job; must run before anything touches a device.

  mode "auto" initialises when an explicit coordinator is given or a cluster is detected, "on"
  always (letting JAX detect the cluster), "off" never.
  """
  explicit = coordinator_address is not None
  if mode == "off" or (mode == "auto" and not explicit and not in_multihost_cluster()):
    return
  if explicit and (num_processes is None or process_id is None):
    raise ValueError("--coordinator_address needs --num_processes and --process_id")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  logging.info("process %d of %d: %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
