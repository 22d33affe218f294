"""Masks and maps register with the model's base grid on a wide image: a known object's patches
from eval.metrics.iou.mask_to_grid equal the patches where the real transformers processors put it
(LLaVA-1.5's centre-cropping CLIP processor, LLaVA-NeXT's any-res base image)."""

import numpy as np
import pytest
import transformers
from PIL import Image, ImageDraw

from eval.metrics import iou
from interpret import visual

GRID, SIZE, PATCH = (24, 24), 336, 14
RED, GREEN = (230, 20, 20), (20, 200, 20)


def processors():
  clip = transformers.CLIPImageProcessor(size={"shortest_edge": SIZE}, do_center_crop=True,
                                         crop_size={"height": SIZE, "width": SIZE})
  next_ = transformers.LlavaNextImageProcessor(
      size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE},
      image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]])
  return {"llava-1.5": clip, "llava-next": next_}


def base_pixels(processor, image: Image.Image) -> np.ndarray:
  """[336, 336, 3] in [0, 1]: the base image the processor gives the vision tower."""
  values = np.asarray(processor(image, return_tensors="np")["pixel_values"], np.float64)
  base = values[0, 0] if values.ndim == 5 else values[0]  # any-res: the base image comes first
  mean, std = np.asarray(processor.image_mean), np.asarray(processor.image_std)
  return base.transpose(1, 2, 0) * std + mean


def patches_of(colour_mask: np.ndarray) -> np.ndarray:
  """[576] bool: patches of the 336 px base image at least half covered."""
  share = colour_mask.reshape(GRID[0], PATCH, GRID[1], PATCH).mean((1, 3))
  return (share >= 0.5).reshape(-1)


def wide_image(red_box, green_box=None):
  """1008 x 336 blue image with a red rectangle (and a green one)."""
  image = Image.new("RGB", (1008, 336), (20, 20, 200))
  draw = ImageDraw.Draw(image)
  draw.rectangle([red_box[0], red_box[1], red_box[2] - 1, red_box[3] - 1], fill=RED)
  if green_box:
    draw.rectangle([green_box[0], green_box[1], green_box[2] - 1, green_box[3] - 1], fill=GREEN)
  return image


def box_mask(box, width=1008, height=336):
  mask = np.zeros((height, width), bool)
  mask[box[1]:box[3], box[0]:box[2]] = True
  return mask


def test_views_of_the_real_processors():
  found = processors()
  assert visual.view_of_processor(found["llava-1.5"]) == "center_crop"
  assert visual.view_of_processor(found["llava-next"]) == "squash"


@pytest.mark.parametrize("model,view,red,green", [
    # LLaVA-1.5 sees the centre 336 x 336 of the 1008 x 336 image: x in [336, 672).
    ("llava-1.5", "center_crop", (336 + 5 * PATCH, 8 * PATCH, 336 + 10 * PATCH, 13 * PATCH),
     (14, 14, 200, 300)),
    # LLaVA-NeXT's base image squashes the width by 3: 42 original px per patch column.
    ("llava-next", "squash", (5 * 3 * PATCH, 8 * PATCH, 10 * 3 * PATCH, 13 * PATCH), None),
])
def test_a_known_object_lands_on_the_patches_the_processor_puts_it(model, view, red, green):
  processor = processors()[model]
  image = wide_image(red, green)
  pixels = base_pixels(processor, image)
  is_red = (pixels[..., 0] > 0.6) & (pixels[..., 1] < 0.4) & (pixels[..., 2] < 0.4)
  truth = patches_of(is_red)
  expected = np.zeros(GRID, bool)
  expected[8:13, 5:10] = True
  assert np.array_equal(truth, expected.reshape(-1))  # where the real processor puts the object
  assert np.array_equal(iou.mask_to_grid(box_mask(red), GRID, view), truth)
  # Our base view is the processor's image (up to resampling at the object's edges).
  ours = np.asarray(visual.base_view(image, SIZE, view), np.float64) / 255
  assert np.mean(np.abs(ours - pixels)) < 0.02
  if green is not None:
    # The left margin is cropped away: an object there covers no patch; squashing would misplace
    # both objects.
    assert not iou.mask_to_grid(box_mask(green), GRID, view).any()
    assert iou.mask_to_grid(box_mask(green), GRID, "squash").any()
    assert not np.array_equal(iou.mask_to_grid(box_mask(red), GRID, "squash"), truth)


def test_masked_prompt_of_a_cropped_view_shows_the_crop():
  # A map active on the red object's patches: the masked image keeps the object bright and darkens
  # the rest of the centre square; the cropped-away green margin is not in it.
  red = (336 + 5 * PATCH, 8 * PATCH, 336 + 10 * PATCH, 13 * PATCH)
  image = wide_image(red, (14, 14, 200, 300))
  patch_map = iou.mask_to_grid(box_mask(red), GRID, "center_crop").astype(np.float32)
  masked = np.asarray(visual.dim_mask(image, patch_map, GRID, SIZE, "center_crop"), np.float64)
  inside = masked[8 * PATCH + 7:13 * PATCH - 7, 5 * PATCH + 7:10 * PATCH - 7]  # past the ramp
  assert np.abs(inside - RED).max() <= 3
  outside = np.ones((SIZE, SIZE), bool)
  outside[7 * PATCH:14 * PATCH, 4 * PATCH:11 * PATCH] = False
  assert masked[outside].max() <= 0.13 * 230 + 1  # darkened to ~12%
  assert not ((masked[..., 1] > 100) & (masked[..., 0] < 60)).any()  # no green anywhere
