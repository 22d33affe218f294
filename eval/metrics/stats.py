"""Aggregates over latents (mean, median, seeded bootstrap CI of the mean), paired bootstrap
intervals of a change; AUROC by Mann-Whitney U."""

from __future__ import annotations

import numpy as np

# Bootstrap resamples are drawn in blocks of at most this many indices: memory stays bounded
# (about 80 MB) even for 1000 resamples of 131k latents.
_BLOCK_ELEMENTS = 10_000_000


def bootstrap_mean_ci(values: np.ndarray, resamples: int, seed: int,
                      level: float = 0.95) -> tuple[float, float]:
  """Percentile bootstrap interval of the mean: resample the values with replacement."""
  values = np.asarray(values, np.float64)
  n = len(values)
  rng = np.random.default_rng(seed)
  means = np.empty(resamples)
  block = max(1, _BLOCK_ELEMENTS // n)
  for start in range(0, resamples, block):
    stop = min(start + block, resamples)
    means[start:stop] = values[rng.integers(0, n, (stop - start, n))].mean(axis=1)
  tail = (1 - level) / 2 * 100
  low, high = np.percentile(means, [tail, 100 - tail])
  return float(low), float(high)


def summarize(values, resamples: int, seed: int) -> dict:
  """{"n", "mean", "median", "ci95"} of the finite values; None where there are none."""
  values = np.asarray([v for v in values if v is not None], np.float64)
  values = values[np.isfinite(values)]
  if not len(values):
    return {"n": 0, "mean": None, "median": None, "ci95": None}
  ci = bootstrap_mean_ci(values, resamples, seed) if resamples > 0 else None
  return {"n": int(len(values)), "mean": float(values.mean()), "median": float(np.median(values)),
          "ci95": list(ci) if ci else None}


def auroc(positives, negatives) -> float:
  """P(positive > negative) + P(tie) / 2, from the rank sum of the positives (Mann-Whitney U)."""
  positives, negatives = np.asarray(positives, np.float64), np.asarray(negatives, np.float64)
  if not len(positives) or not len(negatives):
    raise ValueError("AUROC needs at least one positive and one negative")
  values = np.concatenate([positives, negatives])
  _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
  average_rank = np.cumsum(counts) - (counts - 1) / 2  # 1-based; tied values share their mean rank
  rank_sum = average_rank[inverse[:len(positives)]].sum()
  u = rank_sum - len(positives) * (len(positives) + 1) / 2
  return float(u / (len(positives) * len(negatives)))


def paired_bootstrap_ci(statistic, n: int, resamples: int, seed: int,
                        level: float = 0.95) -> tuple[float, float]:
  """Percentile interval of `statistic(indices [resamples, n]) -> [resamples]` over resamples of
  the n items with replacement; a paired comparison passes one statistic that computes both arms
  on the same indices (e.g. steered minus plain), so the two share every resample."""
  indices = np.random.default_rng(seed).integers(0, n, (resamples, n))
  tail = (1 - level) / 2 * 100
  low, high = np.percentile(np.asarray(statistic(indices), np.float64), [tail, 100 - tail])
  return float(low), float(high)
