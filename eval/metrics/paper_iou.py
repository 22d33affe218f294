"""The paper's IoU, computed as its code computes it (`eval.grounded_iou --method=paper`).

The paper (EvolvingLMMs-Lab/multimodal-sae: features/features.py `upsample_mask`,
agents/scorers/segment/segment_scorer.py `SegmentScorer`, launch/score/segment.py) scores a latent
on each of its top images like this:

* the latent's base-grid map is binarised at 1e-5 and upsampled bilinearly to 336 x 336 (the
  explainer's mask, interpret.visual.inactive_mask); a pixel is active where that mask is below 224.
  The bilinear ramp widens every active patch by about half a patch on each side: one active patch
  of a 24 x 24 grid covers about 780 pixels instead of 196;
* the image, resized (squashed) to 336 x 336 with PIL's default filter, is grounded with the
  latent's refined label: GroundingDINO boxes scoring over 0.3, truncated to whole pixels (the
  transformers zero-shot-object-detection pipeline they call returns integer boxes), SAM's three
  candidate masks of each box (their call keeps multimask_output's default), all of them unioned;
* pixel IoU of the two masks; an image where grounding finds nothing counts 0 (their exception
  path), and a latent's IoU is the mean over its images.

Their random baseline (RandomSegmentScorer, 10 trials) scores, for every latent, `shown` images drawn
uniformly with replacement from the whole image set (torch.randint, trial by trial, latent by latent)
with the latent's own maps on those images: a latent silent on an image scores 0 there, hence the
paper's 0.005. `random_draws` makes the same draws from a seed; `latent_maps` computes the maps.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from interpret import visual

SIZE = visual.PROMPT_SIZE  # 336: the CLIP-336 base view


def active_pixels(patch_map: np.ndarray, grid: tuple[int, int], size: int = SIZE) -> np.ndarray:
  """[size, size] bool: where the upsampled binary mask is below 224 (their `mask_np < 224`)."""
  return np.asarray(visual.inactive_mask(patch_map, grid, size)) < visual.DIM


def base_image(image: Image.Image, size: int = SIZE) -> Image.Image:
  """The image they ground: `image.resize(mask.size).convert("RGB")` (PIL's default filter)."""
  return image.resize((size, size)).convert("RGB")


def whole_pixel_boxes(boxes: list[list[float]]) -> list[list[int]]:
  """Boxes as the detection pipeline hands them on: each coordinate truncated toward zero."""
  return [[int(v) for v in box] for box in boxes]


def pixel_iou(pred: np.ndarray, target: np.ndarray) -> float:
  """|pred & target| / |pred | target| in float64; NaN when both are empty (their 0 / 0)."""
  pred, target = np.asarray(pred, bool), np.asarray(target, bool)
  union = int((pred | target).sum())
  return float((pred & target).sum()) / union if union else float("nan")


def latent_iou(image_ious: list[float | None]) -> float:
  """Mean over a latent's images, an image without a grounding (None) counting 0, as their
  `(sum(iou_scores) + bad_cases) / len(iou_scores)` with -1 per bad case."""
  return float(np.mean([0.0 if v is None else v for v in image_ious])) if image_ious else float("nan")


def random_draws(num_images: int, shown: int, trials: int, num_latents: int, seed: int) -> np.ndarray:
  """[trials, latents, shown] image indices: torch.randint(0, num_images, (shown,)) per latent,
  latents in order within each trial, from a generator seeded with `seed` (their draws after
  torch.manual_seed(seed))."""
  import torch
  generator = torch.Generator().manual_seed(seed)
  return np.stack([np.stack([torch.randint(0, num_images, (shown,), generator=generator).numpy()
                             for _ in range(num_latents)]) for _ in range(trials)]).reshape(
                                 trials, num_latents, shown)


def image_iou(grounder, image: Image.Image, label: str, patch_map: np.ndarray,
              grid: tuple[int, int]) -> tuple[list[list[int]], float | None]:
  """(boxes, IoU) of one image as their SegmentScorer computes it: None when no box is found (an
  image they count 0), NaN when both masks are empty. `grounder`: eval.models.grounding.Grounder."""
  image = base_image(image)
  boxes = whole_pixel_boxes(grounder.boxes(image, label))
  if not boxes:
    return boxes, None
  return boxes, pixel_iou(active_pixels(patch_map, grid), grounder.mask(image, boxes, multimask=True))


def latent_maps(store, sae, pairs, patches: int) -> dict:
  """{(image id, latent): [patches] float32} for the (image id, latent) `pairs` where the latent
  fires on a base-grid patch of the image (absent: silent everywhere there), the SAE
  (interpret.sae.SAE, on any device) encoding the store's rows of those images."""
  import torch
  from sae_jax.store import KIND_IMAGE_BASE
  pairs = np.unique(np.asarray(pairs, np.int64).reshape(-1, 2), axis=0)
  wanted_keys = pairs[:, 0] * sae.num_latents + pairs[:, 1]
  device = sae.W_enc.device
  maps: dict = {}
  for _, acts, meta in store.iter_shards():
    rows = np.flatnonzero((meta["kind"] == KIND_IMAGE_BASE) & np.isin(meta["image_id"], pairs[:, 0]))
    for start in range(0, len(rows), 4096):
      chunk = rows[start:start + 4096]
      with torch.no_grad():
        values, indices = sae.encode(torch.from_numpy(np.asarray(acts[chunk], np.float32)).to(device))
      values, indices = values.float().cpu().numpy(), indices.cpu().numpy()
      images = meta["image_id"][chunk].astype(np.int64)[:, None]
      hit = np.isin(images * sae.num_latents + indices, wanted_keys) & (values > 0)
      row, slot = np.nonzero(hit)
      for r, s, value in zip(row, slot, values[row, slot]):
        key = (int(images[r, 0]), int(indices[r, s]))
        maps.setdefault(key, np.zeros(patches, np.float32))[meta["patch"][chunk[r]]] = value
  return maps
