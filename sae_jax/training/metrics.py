"""Training metrics: one JSON line per logged step plus TensorBoard events, on process 0 only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sae_jax.files import atomic_write_bytes


class MetricWriter:
  """Appends `{"step": s, ...}` lines to workdir/metrics.jsonl and scalars to workdir/tb/.

  On resume, lines logged after the restored checkpoint (work that is about to be redone) are
  dropped, so the file reads as one uninterrupted run.
  """

  def __init__(self, workdir: str | Path, *, resume_step: int, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    self.path = Path(workdir) / "metrics.jsonl"
    if self.path.exists():
      kept = [line for line in self.path.read_text().splitlines()
              if line.strip() and json.loads(line)["step"] <= resume_step]
      # Atomic: a rewrite that fails midway (disk full, kill) must not lose the lines it keeps.
      atomic_write_bytes(self.path, "".join(line + "\n" for line in kept).encode())
    self._file = open(self.path, "a")
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._tb = SummaryWriter(str(Path(workdir) / "tb"), purge_step=resume_step + 1)

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: float(np.asarray(v)) for k, v in scalars.items()}}
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    for name, value in row.items():
      if name != "step":
        self._tb.add_scalar(name, value, step)

  def close(self) -> None:
    if self.enabled:
      self._file.close()
      self._tb.close()
