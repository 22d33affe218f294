"""`python -m eval.sweep_report`: a sweep of SAEs on one page (markdown and HTML).

  python -m eval.sweep_report --sweep=SWEEP --out=REPORT
  python -m eval.sweep_report --workdirs=RUN_A,RUN_B --out=REPORT

SWEEP is the --workdir of a `sae_jax.train` sweep (its sweep.json lists the members' workdirs);
--workdirs takes runs trained separately (both may be given). Writes REPORT/sweep.md,
REPORT/sweep.html, REPORT/fvu_vs_l0.png (one point per SAE, the Pareto frontier drawn) and
REPORT/sweep_curves.png (FVU, L0 and dead fraction against tokens, all members on shared axes).
A member that has logged nothing yet is listed as such; the report may be written while the sweep
trains. Names and any text read from the files are escaped in both pages.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from absl import flags

from eval.reports import plots, sweep
from eval.reports.page import Picture, ReportError, Section, Table, fmt, to_html, to_markdown
from sae_jax import cli
from sae_jax.files import atomic_write_bytes

_SWEEP = flags.DEFINE_string("sweep", None, "Sweep folder of sae_jax.train (or its sweep.json).")
_WORKDIRS = flags.DEFINE_list("workdirs", [], "Training workdirs of separately trained runs.")
_OUT = flags.DEFINE_string("out", None, "Folder to write the report to.", required=True)
_TITLE = flags.DEFINE_string("title", "SAE sweep report", "Title of the report.")

NO_METRICS = "no metrics yet"


def _finite(value) -> bool:
  return isinstance(value, (int, float)) and math.isfinite(value)


def _plotted(members: list[sweep.Member]) -> list[sweep.Member]:
  """The members with a final FVU and L0 that a log axis can place."""
  return [m for m in members if m.final and _finite(m.final.fvu) and _finite(m.final.l0)
          and m.final.l0 > 0]


def definitions(members: list[sweep.Member]) -> str:
  text = (f"FVU, L0, dead fraction and tokens/s are each member's means over the last "
          f"{sweep.TAIL_FRACTION:.0%} of its logged rows of metrics.jsonl (at least the last row; "
          "the 'rows' column says how many); tokens seen = the last logged step x the batch size. "
          "FVU is the fraction of variance unexplained, L0 the mean number of active latents per "
          "token, both on the training batches.")
  if any(m.final and m.final.inference for m in members):
    text += (" Members that log inference-mode numbers (BatchTopK: the JumpReLU threshold the "
             "exported SAE uses) are shown with those, inference_fvu and inference_l0, in the "
             "table, the plots and the curves ('inference' in the 'FVU, L0 of' column).")
  return text


def frontier_section(members: list[sweep.Member], on: dict[str, bool], out: Path) -> Section:
  plotted = _plotted(members)
  if not plotted:
    return Section("FVU against L0", ["No member has logged metrics yet."])
  plots.fvu_vs_l0([{"name": m.name, "architecture": m.architecture, "l0": m.final.l0,
                    "fvu": m.final.fvu, "pareto": on[m.name]} for m in plotted],
                  out / "fvu_vs_l0.png")
  front = sorted((m for m in plotted if on[m.name]), key=lambda m: m.final.l0)
  return Section("FVU against L0", [
      Picture("fvu_vs_l0.png", "FVU against L0, one point per SAE"),
      "Pareto frontier (no other SAE has an FVU and an L0 both lower or equal, one of them lower): "
      + ", ".join(m.name for m in front) + "."])


def table_section(members: list[sweep.Member], on: dict[str, bool]) -> Section:
  widths = sorted({w for m in members if m.final for w in m.final.prefix_fvu})
  inference = any(m.final and m.final.inference for m in members)
  overrides = any(m.overrides for m in members)
  headers = (["name", "architecture", "width", "k", "lr", "tokens seen", "rows", "FVU", "L0",
              "dead fraction", "tokens/s", "Pareto"] + (["FVU, L0 of"] if inference else [])
             + [f"FVU of the first {w}" for w in widths] + (["flags"] if overrides else []))
  # Most sparse first, members without metrics last.
  ordered = sorted(members, key=lambda m: (m.final is None or not _finite(m.final.l0),
                                           m.final.l0 if m.final else 0,
                                           m.final.fvu if m.final else 0))
  flag_text = lambda m: " ".join(f"--{k}={v}" for k, v in m.overrides.items())
  rows = []
  for m in ordered:
    f = m.final
    if f is None:
      metrics = [NO_METRICS] + [""] * (6 + inference + len(widths))
    else:
      speed = round(f.tokens_per_s) if _finite(f.tokens_per_s) else f.tokens_per_s
      metrics = ([fmt(m.tokens), f.rows, fmt(f.fvu), fmt(f.l0), fmt(f.dead_fraction), fmt(speed),
                  "yes" if on.get(m.name) else ""]
                 + (["inference" if f.inference else "training"] if inference else [])
                 + [fmt(f.prefix_fvu.get(w)) for w in widths])
    rows.append([m.name, fmt(m.architecture), fmt(m.width), fmt(m.k), fmt(m.lr), *metrics]
                + ([flag_text(m)] if overrides else []))
  return Section("SAEs", [definitions(members), Table(headers, rows)])


def curves_section(members: list[sweep.Member], out: Path) -> Section:
  logged = [m for m in members if m.final and m.batch_size]
  if not logged:
    return Section("Training curves", ["No member has logged metrics yet."])

  def lines(key: str) -> list:
    found = []
    for m in logged:
      points = [(r["step"] * m.batch_size, sweep.row_value(r, key)) for r in m.rows
                if _finite(sweep.row_value(r, key))]
      found.append((m.name, *(zip(*points) if points else ((), ()))))
    return found

  plots.sweep_curves([("FVU", lines("fvu")), ("L0", lines("l0")),
                      ("dead fraction", lines("dead_fraction"))], out / "sweep_curves.png")
  return Section("Training curves", [
      Picture("sweep_curves.png", "FVU, L0 and dead fraction against tokens seen"),
      "Every logged row, against tokens seen (step x batch size)."])


def main():
  if not (_SWEEP.value or _WORKDIRS.value):
    raise ReportError("nothing to report: pass --sweep and/or --workdirs")
  members = sweep.read_sweep(Path(_SWEEP.value)) if _SWEEP.value else []
  members += sweep.read_workdirs(_WORKDIRS.value)
  names = [m.name for m in members]
  if len(set(names)) != len(names):
    raise ReportError(f"--sweep, --workdirs: members named "
                      f"{sorted({n for n in names if names.count(n) > 1})} more than once")
  plotted = _plotted(members)
  on = dict(zip([m.name for m in plotted],
                sweep.pareto([(m.final.l0, m.final.fvu) for m in plotted])))
  out = Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  source = ", ".join(([f"sweep {_SWEEP.value}"] if _SWEEP.value else [])
                     + ([f"workdirs {', '.join(_WORKDIRS.value)}"] if _WORKDIRS.value else []))
  waiting = [m.name for m in members if m.final is None]
  overview = Section("Sweep", [f"{len(members)} SAEs from {source}; "
                               f"{len(members) - len(waiting)} with logged metrics"
                               + (f", {NO_METRICS}: {', '.join(waiting)}." if waiting else ".")])
  sections = [overview, frontier_section(members, on, out), table_section(members, on),
              curves_section(members, out)]
  atomic_write_bytes(out / "sweep.md", to_markdown(_TITLE.value, sections).encode())
  atomic_write_bytes(out / "sweep.html", to_html(_TITLE.value, sections).encode())
  print(json.dumps({"ok": True, "members": len(members), "no_metrics": waiting,
                    "pareto": [n for n, is_on in on.items() if is_on],
                    "markdown": str(out / "sweep.md"), "html": str(out / "sweep.html")}))


if __name__ == "__main__":
  cli.run(main, (ReportError,))
