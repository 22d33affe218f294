"""IoU between a latent's activation maps and ground-truth masks, compared at the patch grid.

A latent's map is binarised: a patch is in it when the latent's activation there exceeds the
threshold (default 1e-5, "the latent fired here", the same cut as the explainer's masked prompt in
interpret/visual.py). A pixel mask is brought to the grid the way the model's base view sees the
image (interpret.visual.view_box: squashed whole, or its centre square for a centre-cropping
processor such as LLaVA-1.5's; cut into h x w patches): a patch is in it when at least half its area
is. Mask pixels outside a crop are never seen and count for no patch.

The random baseline moves each binarised map's active patches to random places (same count, so
the same area), and is scored exactly like the real maps.
"""

from __future__ import annotations

import numpy as np

from interpret import visual
from interpret.visual import ACTIVE_THRESHOLD

DEFAULT_THRESHOLD = ACTIVE_THRESHOLD
COVERED = 0.5  # share of a patch's area a pixel mask must cover for the patch to be in it


def binarise(maps: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
  """[..., patches] bool: where the activation exceeds the threshold."""
  return np.asarray(maps, np.float32) > threshold


def _overlaps(pixels: int, cells: int, start: float = 0.0, stop: float | None = None) -> np.ndarray:
  """[cells, pixels]: the share of each cell that each pixel covers, the cells splitting the span
  [start, stop) of the pixels (default: all of them) evenly."""
  stop = float(pixels) if stop is None else stop
  width = (stop - start) / cells
  edges = start + np.arange(cells + 1) * width
  lo, hi = np.arange(pixels), np.arange(1, pixels + 1)
  overlap = np.minimum(hi, edges[1:, None]) - np.maximum(lo, edges[:-1, None])
  return np.clip(overlap, 0, None) / width


def mask_to_grid(mask: np.ndarray, grid: tuple[int, int], view: str = "squash") -> np.ndarray:
  """[h*w] bool from a [height, width] pixel mask: patches at least half covered, the grid laid
  over the part of the image the base view covers."""
  mask = np.asarray(mask, np.float64)
  left, top, right, bottom = visual.view_box(mask.shape[1], mask.shape[0], view)
  covered = (_overlaps(mask.shape[0], grid[0], top, bottom) @ mask
             @ _overlaps(mask.shape[1], grid[1], left, right).T)
  return (covered >= COVERED - 1e-9).reshape(-1)


def iou(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
  """|pred & target| / |pred | target| over the last axis (broadcasting); NaN where both are empty."""
  pred, target = np.asarray(pred, bool), np.asarray(target, bool)
  inter = (pred & target).sum(-1)
  union = (pred | target).sum(-1)
  return np.where(union > 0, inter / np.maximum(union, 1), np.nan)


def mean_iou(pred: np.ndarray, targets: np.ndarray) -> np.ndarray:
  """[concepts] mean over images of the per-image IoU, from pred [images, patches] and targets
  [images, concepts, patches]. An image where the target is absent and the latent fires scores 0;
  one where both are empty says nothing and is left out (NaN if every image is)."""
  return _nan_mean(iou(pred[:, None, :], targets))


def _nan_mean(values: np.ndarray) -> np.ndarray:
  """Mean over axis 0 of the finite entries; NaN (without numpy's warning) where there are none."""
  counted = np.isfinite(values).sum(0)
  return np.where(counted > 0, np.nansum(values, 0) / np.maximum(counted, 1), np.nan)


def shuffled(pred: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Each row of pred [images, patches] with its patches in a random order (same active count)."""
  order = np.argsort(rng.random(pred.shape), axis=-1)
  return np.take_along_axis(pred, order, axis=-1)


def random_mean_iou(pred: np.ndarray, targets: np.ndarray, draws: int,
                    rng: np.random.Generator) -> np.ndarray:
  """[concepts] mean_iou of shuffled maps, averaged over `draws` shuffles."""
  return _nan_mean(np.stack([mean_iou(shuffled(pred, rng), targets) for _ in range(draws)]))


def against_masks(pred: np.ndarray, masks: np.ndarray, draws: int,
                  rng: np.random.Generator) -> tuple[float | None, float | None, list]:
  """(mean IoU, its random baseline, per-image IoUs; None for NaN) of binarised maps
  [images, patches] against one mask per image [images, patches] (e.g. a grounded explanation)."""
  finite = lambda value: float(value) if np.isfinite(value) else None
  targets = masks[:, None, :]
  return (finite(mean_iou(pred, targets)[0]), finite(random_mean_iou(pred, targets, draws, rng)[0]),
          [finite(v) for v in iou(pred, masks)])
