"""PNG plots of eval.clip_score, eval.report and eval.sweep_report: score distributions, training
curves, a sweep's FVU against L0 and its members' curves on shared axes.

matplotlib's object API (`Figure`, no pyplot): no global state, no display, safe in threads.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib import ticker
from matplotlib.figure import Figure

# The per-latent CLIP scores and the baselines they are compared with, in drawing order.
SCORE_SERIES = (("clip_score", "explanation vs top images"),
                ("random_baseline", "vs random images"),
                ("shuffled_baseline", "shuffled explanations"))
MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def _values(rows: list[dict], key: str) -> np.ndarray:
  return np.asarray([r[key] for r in rows if r.get(key) is not None], np.float64)


def score_distributions(rows: list[dict], path: Path) -> None:
  """Histograms of the per-latent CLIP score against both baselines, and of the held-out AUROC."""
  fig = Figure(figsize=(11, 4), layout="constrained")
  left, right = fig.subplots(1, 2)
  series = [(label, _values(rows, key)) for key, label in SCORE_SERIES]
  finite = np.concatenate([v for _, v in series]) if series else np.zeros(0)
  bins = np.linspace(finite.min(), finite.max() + 1e-9, 31) if finite.size else 10
  for label, values in series:
    if values.size:
      left.hist(values, bins=bins, histtype="step", linewidth=1.8,
                label=f"{label} (mean {values.mean():.2f})")
  left.set(xlabel="CLIP score, mean per latent (100 max(cos, 0))", ylabel="latents",
           title="CLIP score vs baselines")
  left.legend(fontsize=8)
  auroc = _values(rows, "heldout_auroc")
  if auroc.size:
    right.hist(auroc, bins=np.linspace(0, 1, 21), color="tab:purple")
    right.set_title(f"Held-out AUROC (mean {auroc.mean():.3f})")
  else:
    right.set_title("Held-out AUROC: no latent has held-out top images")
  right.axvline(0.5, color="gray", linestyle="--", linewidth=1)
  right.set(xlabel="AUROC: unshown top images vs non-top images", ylabel="latents", xlim=(0, 1))
  fig.savefig(path, dpi=110)


def training_curves(rows: list[dict], keys: list[str], path: Path) -> None:
  """One panel per metric against the training step."""
  columns = min(3, len(keys))
  fig = Figure(figsize=(4.2 * columns, 3.2 * -(-len(keys) // columns)), layout="constrained")
  axes = np.atleast_1d(fig.subplots(-(-len(keys) // columns), columns, squeeze=False)).ravel()
  for ax, key in zip(axes, keys):
    points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    steps, values = zip(*points) if points else ((), ())
    ax.plot(steps, values, linewidth=1.5)
    ax.set(title=key, xlabel="step")
    if key in ("fvu", "loss", "mse") and values and min(values) > 0:
      ax.set_yscale("log")  # reconstruction errors fall by orders of magnitude
  for ax in axes[len(keys):]:
    ax.set_visible(False)
  fig.savefig(path, dpi=110)


def _literal(text: str) -> str:
  """Text as matplotlib draws it literally: `$` would start math, and a legend leaves out labels
  that start with `_`."""
  text = str(text).replace("$", r"\$")
  return " " + text if text.startswith("_") else text


def _plain_ticks(axis) -> None:
  """A log axis labelled 4, 8, 0.3 rather than 4x10^0. Its minor ticks are labelled where the
  decades are too few to be read from the major ones alone: all within a factor of 3, those at 2,
  3 and 5 x 10^n within a factor of 20."""
  def minor(value, _):
    low, high = axis.get_view_interval()
    leading = round(value / 10 ** math.floor(math.log10(value)))
    span = high / max(low, 1e-300)
    return f"{value:g}" if span <= 3 or (span <= 20 and leading in (2, 3, 5)) else ""
  axis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
  axis.set_minor_formatter(ticker.FuncFormatter(minor))


def fvu_vs_l0(points: list[dict], path: Path) -> None:
  """One point per SAE (dicts with name, architecture, l0, fvu, pareto), labelled with its name,
  marker and colour by architecture, L0 on a log axis; the Pareto frontier joins its points."""
  fig = Figure(figsize=(8, 5.5), layout="constrained")
  ax = fig.subplots()
  for i, kind in enumerate(sorted({p["architecture"] for p in points})):
    mine = [p for p in points if p["architecture"] == kind]
    ax.scatter([p["l0"] for p in mine], [p["fvu"] for p in mine], s=45, zorder=3,
               marker=MARKERS[i % len(MARKERS)], color=f"C{i}", label=_literal(kind))
  for p in points:
    ax.annotate(_literal(p["name"]), (p["l0"], p["fvu"]), xytext=(4, 4),
                textcoords="offset points", fontsize=7)
  front = sorted((p["l0"], p["fvu"]) for p in points if p["pareto"])
  if front:
    ax.plot(*zip(*front), color="gray", linestyle="--", linewidth=1, zorder=2,
            label="Pareto frontier")
  ax.set_xscale("log")
  _plain_ticks(ax.xaxis)
  ax.set(xlabel="L0 (active latents per token)", ylabel="FVU (lower is better)",
         title="FVU against L0")
  ax.legend(fontsize=8)
  fig.savefig(path, dpi=110)


def sweep_curves(panels: list[tuple[str, list[tuple[str, list, list]]]], path: Path) -> None:
  """One panel per metric, (title, [(member, tokens, values)]), every member on the panel's
  shared axes; one legend of the members' names."""
  fig = Figure(figsize=(5 * len(panels) + 2, 3.8), layout="constrained")
  axes = np.atleast_1d(fig.subplots(1, len(panels)))
  for ax, (title, lines) in zip(axes, panels):
    for i, (name, tokens, values) in enumerate(lines):
      ax.plot(tokens, values, linewidth=1.3, color=f"C{i % 10}",
              linestyle=("-", "--", ":")[i // 10 % 3], label=_literal(name))
    ax.set(title=title, xlabel="tokens seen")
    if title.startswith("FVU") and all(min(v, default=1) > 0 for _, _, v in lines):
      ax.set_yscale("log")  # reconstruction errors fall by orders of magnitude
      _plain_ticks(ax.yaxis)
  handles, labels = axes[0].get_legend_handles_labels()
  if handles:
    fig.legend(handles, labels, loc="outside right upper", fontsize=8)
  fig.savefig(path, dpi=110)
