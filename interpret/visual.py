"""Visual prompts: where a latent fires on an image, from its base-grid patch map [h*w].

The image is shown as the model's base view sees it (VIEWS): "squash", the whole image resized to a
square, as the LLaVA-NeXT / OneVision any-res base image and the paper's code
(`image.resize((336, 336))`) do; or "center_crop", the central square (LLaVA-1.5's CLIP processor
resizes the shortest edge to 336 and crops the centre, so on a wide image the sides are never seen).
`view_of_processor` tells which from a transformers image processor; `view_box` is the part of the
original image the base grid covers, so that masks and maps register on non-square images.

* `dim_mask`: the paper's explainer input. Binarise (active > 1e-5), upsample the mask bilinearly,
  keep active regions and darken the rest to ~12% brightness (224/255 black blended in).
* `heatmap`: saev's overlay. Each patch is coloured with the plasma colormap with opacity
  proportional to act / upper, where `upper` is shared by all images of a latent (its max), so that
  intensities compare across images.
* `image_grid`: tiles images into one (for a dashboard or a single-image explainer prompt).
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from harvest.tokens import VIEWS, view_of_processor  # noqa: F401 (the views' one home)

ACTIVE_THRESHOLD = 1e-5
DIM = 224  # black blended over inactive regions: 224/255 -> ~12% of the original brightness
PROMPT_SIZE = 336
# matplotlib's plasma colormap at 0, 1/8, ..., 1 (matplotlib is not a dependency).
_PLASMA = np.array([[13, 8, 135], [75, 3, 161], [126, 3, 168], [170, 35, 149], [204, 71, 120],
                    [230, 108, 92], [248, 149, 64], [253, 196, 39], [240, 249, 33]], np.float64)


def _grid(patch_map: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
  patch_map = np.asarray(patch_map, np.float32)
  if patch_map.shape != (grid[0] * grid[1],):
    raise ValueError(f"patch map has shape {patch_map.shape}, expected [{grid[0] * grid[1]}] "
                     f"for a {grid[0]}x{grid[1]} grid")
  return patch_map.reshape(grid)


def view_box(width: int, height: int, view: str = "squash") -> tuple[float, float, float, float]:
  """(left, top, right, bottom) in pixels of the original image that the base grid covers."""
  if view == "squash":
    return 0.0, 0.0, float(width), float(height)
  if view != "center_crop":
    raise ValueError(f"unknown base view {view!r}; expected one of {VIEWS}")
  side = min(width, height)
  left, top = (width - side) / 2, (height - side) / 2
  return left, top, left + side, top + side


def base_view(image: Image.Image, size: int = PROMPT_SIZE, view: str = "squash") -> Image.Image:
  """The part of the image the base grid covers, resized to size x size."""
  image = image.convert("RGB")
  return image.resize((size, size), Image.Resampling.BICUBIC,
                      box=view_box(image.width, image.height, view))


def inactive_mask(patch_map: np.ndarray, grid: tuple[int, int], size: int = PROMPT_SIZE) -> Image.Image:
  """The paper's mask ("L", size x size): DIM where the latent is silent (activation < 1e-5), 0
  where it fires, upsampled bilinearly, so pixels near an active patch fall below DIM too."""
  inactive = (_grid(patch_map, grid) < ACTIVE_THRESHOLD).astype(np.uint8) * DIM
  return Image.fromarray(inactive, "L").resize((size, size), Image.Resampling.BILINEAR)


def dim_mask(image: Image.Image, patch_map: np.ndarray, grid: tuple[int, int],
             size: int = PROMPT_SIZE, view: str = "squash") -> Image.Image:
  """The paper's masked image: active patches as they are, the rest darkened."""
  black = Image.new("RGB", (size, size))
  return Image.composite(black, base_view(image, size, view), inactive_mask(patch_map, grid, size))


def plasma(t: np.ndarray) -> np.ndarray:
  """RGB uint8 [..., 3] of values t in [0, 1]."""
  t = np.clip(np.asarray(t, np.float64), 0.0, 1.0) * (len(_PLASMA) - 1)
  lo = np.minimum(np.floor(t).astype(int), len(_PLASMA) - 2)
  frac = (t - lo)[..., None]
  return np.round(_PLASMA[lo] * (1 - frac) + _PLASMA[lo + 1] * frac).astype(np.uint8)


def heatmap_overlay(patch_map: np.ndarray, grid: tuple[int, int], upper: float,
                    size: int = PROMPT_SIZE, opacity: float = 0.9) -> Image.Image:
  """RGBA [size, size]: one block per patch, colour plasma(act/upper), alpha opacity*act/upper."""
  if upper <= 0:
    raise ValueError(f"heatmap upper bound must be positive, got {upper}")
  t = np.clip(_grid(patch_map, grid) / upper, 0.0, 1.0)
  rgba = np.concatenate([plasma(t), np.round(255 * opacity * t)[..., None].astype(np.uint8)], -1)
  return Image.fromarray(rgba, "RGBA").resize((size, size), Image.Resampling.NEAREST)


def heatmap(image: Image.Image, patch_map: np.ndarray, grid: tuple[int, int], upper: float,
            size: int = PROMPT_SIZE, opacity: float = 0.9, view: str = "squash") -> Image.Image:
  overlay = heatmap_overlay(patch_map, grid, upper, size, opacity)
  return Image.alpha_composite(base_view(image, size, view).convert("RGBA"),
                               overlay).convert("RGB")


def image_grid(images: list[Image.Image], columns: int | None = None, pad: int = 4,
               background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
  """The images (resized to the first one's size) in rows of `columns` (default: a near-square
  layout), `pad` pixels apart."""
  if not images:
    raise ValueError("image_grid needs at least one image")
  w, h = images[0].size
  columns = min(columns or math.ceil(math.sqrt(len(images))), len(images))
  rows = -(-len(images) // columns)
  out = Image.new("RGB", (columns * w + (columns + 1) * pad, rows * h + (rows + 1) * pad), background)
  for i, image in enumerate(images):
    r, c = divmod(i, columns)
    out.paste(image.convert("RGB").resize((w, h)), (pad + c * (w + pad), pad + r * (h + pad)))
  return out


def png_bytes(image: Image.Image) -> bytes:
  """PNG encoding without timestamps or other varying chunks: equal images give equal bytes."""
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  return buffer.getvalue()
