"""Which worker of a multi-worker harvest this process is: from the flags, else from the
launcher's environment."""

from __future__ import annotations

from typing import Mapping

# (index, count) variables of the launchers that start one process per worker, most specific first:
# a SLURM array task (one job per worker), torchrun, a SLURM job step with many tasks.
_LAUNCHERS = (("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"), ("RANK", "WORLD_SIZE"),
              ("SLURM_PROCID", "SLURM_NTASKS"))


class WorkerError(ValueError):
  """Flags or launcher variables that do not name one worker of the harvest."""


def resolve(num_workers: int, worker_index: int, env: Mapping[str, str]) -> tuple[int, int]:
  """(worker index, worker count). --num_workers=0 and --worker_index=-1 (the defaults) come from
  the first launcher whose variables are set, else a single worker."""
  if num_workers and worker_index >= 0:
    index, count, source = worker_index, num_workers, "--worker_index/--num_workers"
  elif num_workers or worker_index >= 0:
    raise WorkerError("--num_workers and --worker_index go together (or neither, to take them "
                      "from torchrun's RANK/WORLD_SIZE or SLURM's variables)")
  else:
    index, count, source = 0, 1, None
    for index_var, count_var in _LAUNCHERS:
      if index_var in env and count_var in env:
        try:
          index, count = int(env[index_var]), int(env[count_var])
        except ValueError as e:
          raise WorkerError(f"{index_var}={env[index_var]!r}, {count_var}={env[count_var]!r}: "
                            "not integers") from e
        if index_var == "SLURM_ARRAY_TASK_ID":  # arrays may start at any index: --array=1-8
          index -= int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        source = f"{index_var}/{count_var}"
        break
  if not 0 <= index < count:
    raise WorkerError(f"worker index {index} of {count} workers (from {source}) is out of range")
  return index, count
