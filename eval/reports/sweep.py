"""The SAEs of a sweep as eval.sweep_report shows them: each one's settings (from its training
workdir's run.json and flags.json) and final numbers (from its metrics.jsonl), and the Pareto
frontier of FVU against L0. Defines no flags.

A sweep folder holds sweep.json, {"members": [{"name", "workdir", "overrides": {flag: value}}]},
and one training workdir per member. The final numbers of a member are the means over the last
TAIL_FRACTION of its logged rows (at least the last row): one logged batch is noisy, and a mean
over a fixed fraction compares runs logged at different rates alike.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from eval.reports.page import ReportError, read_json, read_jsonl

SWEEP_FILE = "sweep.json"
TAIL_FRACTION = 0.1
# BatchTopK runs also log the inference-mode (JumpReLU threshold) numbers once the threshold is
# learned: what the exported SAE does, so they are preferred where logged (row by row; the training
# numbers before that).
INFERENCE_KEYS = {"fvu": "inference_fvu", "l0": "inference_l0"}
PREFIX_FVU = "fvu_prefix_"  # Matryoshka runs: fvu_prefix_<width>, the first <width> latents alone


@dataclasses.dataclass
class Final:
  """A member's numbers at the end of its (so far) logged training."""
  step: int  # the last logged step
  rows: int  # logged rows averaged
  inference: bool  # FVU and L0 are the inference-mode numbers
  fvu: float | None
  l0: float | None
  dead_fraction: float | None
  tokens_per_s: float | None
  prefix_fvu: dict[int, float]  # Matryoshka prefix width -> FVU


@dataclasses.dataclass
class Member:
  name: str
  workdir: Path
  overrides: dict
  architecture: str | None = None  # None: not started (no flags.json yet)
  width: int | None = None
  k: int | None = None
  lr: float | None = None
  batch_size: int | None = None
  rows: list[dict] = dataclasses.field(default_factory=list)  # metrics.jsonl
  final: Final | None = None  # None: no metrics yet

  @property
  def tokens(self) -> int | None:
    """Tokens seen up to the last logged step."""
    if self.final is None or self.batch_size is None:
      return None
    return self.final.step * self.batch_size


def row_value(row: dict, key: str):
  """A metrics.jsonl row's `key`: its inference-mode number where the row has one (fvu, l0)."""
  return row.get(INFERENCE_KEYS[key], row.get(key)) if key in INFERENCE_KEYS else row.get(key)


def _mean(rows: list[dict], key: str) -> float | None:
  values = [v for v in (row_value(r, key) for r in rows) if isinstance(v, (int, float))]
  return math.fsum(values) / len(values) if values else None


def final(rows: list[dict]) -> Final | None:
  if not rows:
    return None
  tail = rows[-max(1, math.ceil(TAIL_FRACTION * len(rows))):]
  inference = INFERENCE_KEYS["fvu"] in rows[-1] and INFERENCE_KEYS["l0"] in rows[-1]
  widths = sorted(int(k[len(PREFIX_FVU):]) for k in rows[-1]
                  if k.startswith(PREFIX_FVU) and k[len(PREFIX_FVU):].isdigit())
  return Final(step=int(rows[-1]["step"]), rows=len(tail), inference=inference,
               fvu=_mean(tail, "fvu"), l0=_mean(tail, "l0"),
               dead_fraction=_mean(tail, "dead_fraction"),
               tokens_per_s=_mean(tail, "tokens_per_s"),
               prefix_fvu={w: _mean(tail, f"{PREFIX_FVU}{w}") for w in widths})


def read_member(name: str, workdir: Path, overrides: dict, flag: str) -> Member:
  """A member from its workdir; one without flags.json (not started) or metrics (just started)
  has no final numbers."""
  member = Member(name, workdir, overrides)
  flags_path, run_path = workdir / "flags.json", workdir / "run.json"
  if not flags_path.exists():
    return member
  flags = read_json(flags_path, flag)
  run = read_json(run_path, flag) if run_path.exists() else {}
  if not isinstance(flags, dict) or not isinstance(run, dict):
    raise ReportError(f"--{flag}: {workdir} holds a flags.json or run.json that is not a JSON "
                      "object (not a sae_jax.train workdir?)")
  sae, resolved = run.get("sae") or {}, flags.get("resolved") or {}
  member.architecture = str(sae.get("architecture") or flags.get("architecture") or "topk")
  if sae.get("matryoshka_prefixes") or flags.get("matryoshka_prefixes"):
    member.architecture += " matryoshka"
  member.width = sae.get("num_latents") or resolved.get("num_latents")
  member.k = sae.get("k") or flags.get("k")
  member.lr = resolved.get("lr") or flags.get("lr")
  member.batch_size = flags.get("batch_size")
  metrics_path = workdir / "metrics.jsonl"
  if metrics_path.exists():
    member.rows = [r for r in read_jsonl(metrics_path, flag) if isinstance(r.get("step"), int)]
    member.final = final(member.rows)
  return member


def read_sweep(path: Path) -> list[Member]:
  """The members of a sweep folder (or its sweep.json); one whose workdir does not exist yet is
  listed as not started."""
  file = path / SWEEP_FILE if path.is_dir() else path
  spec = read_json(file, "sweep")
  members = spec.get("members") if isinstance(spec, dict) else None
  if not isinstance(members, list) or not all(
      isinstance(m, dict) and isinstance(m.get("name"), str) and isinstance(m.get("workdir"), str)
      for m in members):
    raise ReportError(f"--sweep: {file} is not a sweep: expected "
                      '{"members": [{"name": ..., "workdir": ..., "overrides": {...}}, ...]}')
  names = [m["name"] for m in members]
  if len(set(names)) != len(names):
    twice = sorted({n for n in names if names.count(n) > 1})
    raise ReportError(f"--sweep: {file} names members {twice} more than once")
  # Relative workdirs are the sweep folder's; absolute ones are taken as written.
  return [read_member(m["name"], file.parent / m["workdir"], m.get("overrides") or {}, "sweep")
          for m in members]


def read_workdirs(paths: list[str]) -> list[Member]:
  """Separately trained runs, each named by its folder (by its path where two share a name)."""
  folders = [Path(p) for p in paths]
  base = [f.resolve().name for f in folders]
  members = []
  for folder, name in zip(folders, base):
    if not folder.is_dir():
      raise ReportError(f"--workdirs: {folder} does not exist")
    if not (folder / "flags.json").exists():
      raise ReportError(f"--workdirs: {folder} has no flags.json (not a sae_jax.train workdir?)")
    members.append(read_member(name if base.count(name) == 1 else str(folder), folder, {},
                               "workdirs"))
  return members


def pareto(points: list[tuple[float, float]]) -> list[bool]:
  """Which (l0, fvu) points no other point beats: none has both values lower or equal, one of
  them lower. One pass in (l0, fvu) order: a point is on the frontier when its FVU is below every
  earlier point's (or it equals the frontier point before it)."""
  on = [False] * len(points)
  best = None
  for i in sorted(range(len(points)), key=lambda i: points[i]):
    if best is None or points[i][1] < best[1] or points[i] == best:
      on[i], best = True, points[i]
  return on
