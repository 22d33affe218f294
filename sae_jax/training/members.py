"""The SAEs a run trains (the command line's, or one per sweep spec), and what a resume may change.

A member's flags are the command line's with its spec's overrides (config.SWEEP_FLAGS); its
workdir's flags.json and run.json say how it started, and a resume is refused where it would
change what the member computes (config.RESUMABLE_FLAGS), its learning-rate schedule or its
kernels.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

from absl import flags
import optax

from sae_jax import config
from sae_jax.training import checkpoint, sweep
from sae_jax.config import InitConfig, OptimizerConfig, SAEConfig
from sae_jax.kernels.kernel_plan import KernelPlan
from sae_jax.training.metrics import MetricWriter
from sae_jax.store import absolute


class TrainError(Exception):
  """A run that cannot go on (bad flags, a resume that would change the run, a non-finite loss);
  reported as one line."""


@dataclasses.dataclass
class Member:
  """One SAE that the run trains: its workdir and flags, then everything it trains with."""
  name: str | None  # None: a single run (no --sae/--sweep)
  workdir: Path
  flags: dict  # resolved, as its flags.json records them
  run: dict | None = None  # run.json of an earlier start
  old_flags: dict | None = None  # flags.json of an earlier start
  init: InitConfig | None = None
  optim: OptimizerConfig | None = None
  cfg: SAEConfig | None = None
  input_scale: float = 1.0
  init_params: dict | None = None
  peak_lr: float = 0.0
  schedule: optax.Schedule | None = None
  tx: optax.GradientTransformation | None = None
  state: Any = None
  update: Any = None  # the jitted step
  inference: Any = None  # the jitted inference metrics, where inference encodes differently
  mngr: Any = None
  writer: MetricWriter | None = None
  start_step: int = 0
  last_good: int | None = None
  floor_ms: float = 0.0
  tick: tuple[float, int] = (0.0, 0)  # (time, step) that tokens_per_s counts from
  step_metrics: Any = None
  # On the device: (the first step whose loss was not finite, or -1; that loss), every step's
  # loss checked without waiting for it, so a step between log steps is caught too.
  nonfinite: tuple | None = None
  pending: tuple | None = None  # (step, device metrics, nonfinite), fetched one step late
  summary: dict = dataclasses.field(default_factory=dict)
  failed: str | None = None  # the error of a sweep member stopped by a non-finite loss

  def error(self, message: str) -> TrainError:
    return TrainError(message if self.name is None else f"sweep member {self.name}: {message}")


def resolved_flags(values: dict, overrides: dict | None = None,
                   workdir: Path | None = None) -> dict:
  """The knob flags `values` as flags.json records them (JSON types, paths absolute); a sweep
  member's with its overrides and workdir."""
  values = {**values, **(overrides or {})}
  if workdir is not None:
    values["workdir"] = str(workdir)
  for name in sweep.PATH_FLAGS:
    if values[name]:
      values[name] = absolute(values[name])
  return json.loads(json.dumps(values))


def read_members(workdir: Path, values: dict, sae_specs: Sequence[str],
                 sweep_file: str | None) -> tuple[list[sweep.Member], list[Member]]:
  """What to train: the command line's SAE in WORKDIR, or one per --sae/--sweep spec in
  WORKDIR/<name>; each with its earlier start, checked against what a resume may change."""
  try:
    specs = sweep.read_specs(sae_specs, sweep_file, config.SWEEP_FLAGS, flags.FLAGS)
    if specs:
      sweep.check_resumed(workdir, specs)
  except sweep.SweepError as e:
    raise TrainError(str(e)) from e
  if not specs and (workdir / sweep.SWEEP_FILE).exists():
    raise TrainError(f"{workdir} holds a sweep ({sweep.SWEEP_FILE}); rerun it with its "
                     "--sae/--sweep specs, or use a new --workdir")
  if specs and checkpoint.read_run(workdir) is not None:
    raise TrainError(f"{workdir} holds a single run; a sweep needs a new --workdir")
  members = ([Member(s.name, workdir / s.name, resolved_flags(values, s.overrides,
                                                                workdir / s.name))
              for s in specs] or [Member(None, workdir, resolved_flags(values))])
  for m in members:
    if not m.flags["store"]:
      raise m.error("--store is required (on the command line, or in every --sae/--sweep spec)")
    m.init = config.build(InitConfig, m.flags)
    m.optim = config.build(OptimizerConfig, m.flags)
    m.run = checkpoint.read_run(m.workdir)
    m.old_flags = checkpoint.read_flags(m.workdir) if m.run is not None else None
    if m.old_flags is not None:
      check_resumed_flags(m.workdir, m.old_flags, m.flags)
  return specs, members


def flag_text(value) -> str:
  """A flag value as it is written on a command line."""
  if isinstance(value, (list, tuple)):
    return ",".join(map(str, value))
  if isinstance(value, bool):
    return str(value).lower()
  return "" if value is None else str(value)


def changed_knobs(old, new) -> str:
  """The fields in which config `new` differs from `old`, as '--name=new (the run: old)'."""
  return ", ".join(f"--{f.name}={flag_text(getattr(new, f.name))} (the run: "
                   f"{flag_text(getattr(old, f.name))})" for f in dataclasses.fields(new)
                   if getattr(old, f.name) != getattr(new, f.name))


def check_resumed_flags(workdir: Path, old: dict, new: dict) -> None:
  """Refuses a resume whose flags would change the run recorded in WORKDIR/flags.json."""
  for name, value in sorted(new.items()):
    if name not in config.RESUMABLE_FLAGS and name in old and old[name] != value:
      was = f"--{name}={flag_text(old[name])}"
      raise TrainError(f"--{name}={flag_text(value)} but the run in {workdir} used {was}; rerun "
                       f"with {was} to resume it, or use a new --workdir")


def check_resumed_plan(m: Member, plan: KernelPlan, accept: bool) -> None:
  """Refuses a resume whose kernel plan differs from the one recorded, unless `accept`."""
  old = (m.old_flags or {}).get("resolved", {}).get("kernel_plan")
  if old is None or old == plan.to_json() or accept:
    return
  changed = ", ".join(f"{k} {old.get(k)} -> {v}" for k, v in plan.to_json().items()
                      if old.get(k) != v)
  raise m.error(f"the run in {m.workdir} was trained with other kernels ({changed}; "
                "SAE_JAX_NATIVE, a C++ compiler and the devices decide them), which agree only "
                "to allclose; resume where they match, or pass --accept_kernel_plan to go on "
                "with these")


def check_resumed_total(m: Member, new_total: int) -> None:
  """Refuses a new total step count where the learning-rate schedule depends on it: a decay, or a
  warmup that the old total cut short."""
  old_total = m.old_flags["resolved"]["total_steps"]
  warmup, decay = m.optim.lr_warmup_steps, m.optim.lr_decay
  if new_total != old_total and (decay != "constant" or
                                 min(warmup, old_total) != min(warmup, new_total)):
    raise TrainError(f"--steps/--epochs give {new_total} steps but the run in {m.workdir} has "
                     f"{old_total}, and its learning rate (--lr_decay={decay}, "
                     f"--lr_warmup_steps={warmup}) depends on the total; use a new --workdir")
