"""eval.metrics.iou against hand-counted references."""

import numpy as np
import pytest

from eval.metrics import iou


def _patches(indices, size=16):
  out = np.zeros(size, bool)
  out[list(indices)] = True
  return out


def test_iou_counts_intersection_over_union():
  pred, target = _patches({0, 1, 2, 3}), _patches({2, 3, 4, 5})
  assert iou.iou(pred, target) == pytest.approx(2 / 6)
  assert iou.iou(pred, pred) == 1.0
  assert iou.iou(pred, _patches({9})) == 0.0
  assert np.isnan(iou.iou(_patches(()), _patches(())))  # nothing to compare


def test_binarise_keeps_activations_above_the_threshold():
  assert iou.binarise(np.array([0.0, 1e-6, 0.5, 2.0]), 0.4).tolist() == [False, False, True, True]
  assert iou.binarise(np.array([0.0, 1e-6, 2e-5]), iou.DEFAULT_THRESHOLD).tolist() == [
      False, False, True]


def test_pixel_mask_goes_to_the_grid_by_covered_area():
  mask = np.zeros((8, 8), bool)
  mask[:4, :4] = True  # top-left patch: all of it
  mask[:4, 4:6] = True  # top-right: exactly half
  mask[4:6, :2] = True  # bottom-left: a quarter
  assert iou.mask_to_grid(mask, (2, 2)).tolist() == [True, True, False, False]
  # A wide image is squashed to the square grid: the left half of a 4x8 mask is the left column.
  wide = np.zeros((4, 8), bool)
  wide[:, :4] = True
  assert iou.mask_to_grid(wide, (2, 2)).tolist() == [True, False, True, False]
  # Patches that split pixels: 5 columns in 2 patches of 2.5. Columns 2 and 3 cover 0.5 / 2.5 of
  # the left patch and 1.5 / 2.5 of the right one.
  split = np.zeros((3, 5), bool)
  split[:, 2:4] = True
  assert iou.mask_to_grid(split, (1, 2)).tolist() == [False, True]


def test_mean_iou_scores_absent_concepts_zero_and_skips_empty_pairs():
  pred = np.stack([_patches({0, 1}), _patches({4}), _patches(())])
  targets = np.stack([np.stack([_patches({0, 1}), _patches({1})]),   # IoU 1, 1/2
                      np.stack([_patches(()), _patches({4, 5})]),    # absent: 0, 1/2
                      np.stack([_patches(()), _patches({7})])])      # both empty: left out, 0
  assert iou.mean_iou(pred, targets) == pytest.approx([(1 + 0) / 2, (0.5 + 0.5 + 0) / 3])


def test_random_baseline_matches_its_expected_value():
  # One active patch placed at random among 4, one target patch: IoU 1 with probability 1/4.
  pred, targets = _patches({0}, 4)[None], _patches({3}, 4)[None, None]
  rng = np.random.default_rng(0)
  shuffled = iou.shuffled(np.repeat(pred, 5, 0), rng)
  assert shuffled.sum(-1).tolist() == [1] * 5  # the area is kept
  assert iou.random_mean_iou(pred, targets, 4000, rng)[0] == pytest.approx(0.25, abs=0.02)


def test_against_masks_a_planted_latent_scores_one():
  masks = np.stack([_patches({0, 1, 4, 5}), _patches({10}), _patches(())])
  rng = np.random.default_rng(0)
  mean, random, per_image = iou.against_masks(masks.copy(), masks, 20, rng)
  assert per_image == [1.0, 1.0, None] and mean == 1.0 and random < 1.0
  pred = np.stack([_patches({1, 2}), _patches(()), _patches({3})])
  mean, _, per_image = iou.against_masks(pred, masks, 5, rng)
  assert per_image == [pytest.approx(1 / 5), 0.0, 0.0] and mean == pytest.approx(1 / 15)
