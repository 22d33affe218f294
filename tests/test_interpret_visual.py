"""Visual prompts on known patch maps."""

import numpy as np
from PIL import Image

from interpret import visual

GRID = (4, 4)
SIZE = 64  # 16 px per patch


def white():
  return Image.new("RGB", (50, 30), (255, 255, 255))  # not square: the base view squashes it


def one_patch_map(row=1, col=2, value=3.0):
  patch_map = np.zeros(16, np.float32)
  patch_map[row * 4 + col] = value
  return patch_map


def test_dim_mask_keeps_only_the_active_patch_bright():
  out = np.asarray(visual.dim_mask(white(), one_patch_map(), GRID, size=SIZE)).astype(int)[..., 0]
  assert out.shape == (SIZE, SIZE)
  # Bilinear upsampling (as the paper does) makes a single patch a blob peaking at its centre.
  row, col = np.unravel_index(out.argmax(), out.shape)
  assert 16 <= row < 32 and 32 <= col < 48 and out.max() >= 240
  # Beyond the patch's neighbours the image is darkened to ~12%: 255 * (255 - 224) / 255 = 31.
  far = np.ones_like(out, bool)
  far[8:40, 24:56] = False
  assert np.abs(out[far] - 31).max() <= 1


def test_dim_mask_active_block_shows_original_pixels():
  patch_map = np.zeros(16, np.float32)
  patch_map[[5, 6, 9, 10]] = 1.0  # the central 2x2 patches
  out = np.asarray(visual.dim_mask(white(), patch_map, GRID, size=SIZE)).astype(int)
  np.testing.assert_array_equal(out[24:40, 24:40], 255)
  assert np.abs(out[:4, :4] - 31).max() <= 1


def test_dim_mask_threshold():
  patch_map = np.full(16, 1e-6, np.float32)  # below 1e-5: inactive everywhere
  out = np.asarray(visual.dim_mask(white(), patch_map, GRID, size=SIZE)).astype(int)
  assert out.max() <= 32


def test_heatmap_alpha_is_proportional_to_act_over_upper():
  patch_map = one_patch_map(value=2.0)
  full = np.asarray(visual.heatmap_overlay(patch_map, GRID, upper=2.0, size=SIZE, opacity=1.0))
  half = np.asarray(visual.heatmap_overlay(patch_map, GRID, upper=4.0, size=SIZE, opacity=1.0))
  assert full[20, 40, 3] == 255 and abs(int(half[20, 40, 3]) - 128) <= 1
  assert full[0, 0, 3] == 0 and half[0, 0, 3] == 0  # inactive patches are not coloured
  # The colour is plasma: bright yellow at the top, mid magenta-orange halfway.
  np.testing.assert_array_equal(full[20, 40, :3], visual.plasma(1.0))
  np.testing.assert_array_equal(half[20, 40, :3], visual.plasma(0.5))
  composite = np.asarray(visual.heatmap(white(), patch_map, GRID, upper=2.0, size=SIZE)).astype(int)
  np.testing.assert_array_equal(composite[0, 0], 255)  # untouched where the latent is silent
  assert (composite[20, 40] != 255).any()


def test_plasma_endpoints():
  np.testing.assert_array_equal(visual.plasma(np.array([0.0, 1.0, 2.0])),
                                [[13, 8, 135], [240, 249, 33], [240, 249, 33]])


def test_image_grid_layout():
  tiles = [Image.new("RGB", (10, 10), (i * 40, 0, 0)) for i in range(7)]
  out = visual.image_grid(tiles, columns=3, pad=2)
  assert out.size == (3 * 10 + 4 * 2, 3 * 10 + 4 * 2)
  assert out.getpixel((2 + 12 + 5, 2 + 5)) == (40, 0, 0)  # tile 1: row 0, column 1
  assert out.getpixel((2 + 5, 2 + 2 * 12 + 5)) == (240, 0, 0)  # tile 6: row 2, column 0
  assert visual.image_grid(tiles[:5], pad=0).size == (30, 20)  # default: 3 columns for 5 images


def test_png_bytes_are_deterministic():
  assert visual.png_bytes(white()) == visual.png_bytes(white())
