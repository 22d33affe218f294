"""PNG plots of eval.clip_score and eval.report: score distributions and training curves.

matplotlib's object API (`Figure`, no pyplot): no global state, no display, safe in threads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

# The per-latent CLIP scores and the baselines they are compared with, in drawing order.
SCORE_SERIES = (("clip_score", "explanation vs top images"),
                ("random_baseline", "vs random images"),
                ("shuffled_baseline", "shuffled explanations"))


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
