"""Token selection on hand-made batches: kinds, patch indices, BOS and padding."""

import numpy as np
import pytest

from harvest.tokens import ImageLayout, TokenError, select_tokens, text_tokens
from sae_jax.store import KIND_IMAGE_BASE, KIND_IMAGE_OTHER, KIND_TEXT

BOS, PAD, IMG, TXT = 1, 0, 9, 5


def _batch(rows):
  width = max(map(len, rows))
  ids = np.array([r + [PAD] * (width - len(r)) for r in rows])
  mask = np.array([[1] * len(r) + [0] * (width - len(r)) for r in rows])
  return ids, mask


def test_anyres_base_grid_comes_first():
  layout = ImageLayout(image_token_id=IMG, bos_token_id=BOS, grid=(2, 2), base_first=True)
  ids, mask = _batch([[BOS, TXT, IMG, IMG, IMG, IMG, IMG, IMG, TXT], [BOS, IMG, IMG, IMG, IMG, IMG]])
  batch_index, meta = select_tokens(ids, mask, np.array([7, 8]), layout, "all")
  np.testing.assert_array_equal(batch_index, [0] * 8 + [1] * 5)
  np.testing.assert_array_equal(meta["image_id"], [7] * 8 + [8] * 5)
  np.testing.assert_array_equal(meta["position"], list(range(1, 9)) + list(range(1, 6)))
  base, other, text = KIND_IMAGE_BASE, KIND_IMAGE_OTHER, KIND_TEXT
  np.testing.assert_array_equal(
      meta["kind"], [text, base, base, base, base, other, other, text, base, base, base, base, other])
  np.testing.assert_array_equal(meta["patch"], [-1, 0, 1, 2, 3, -1, -1, -1, 0, 1, 2, 3, -1])


def test_single_crop_base_grid_is_the_last_image_tokens():
  # LLaVA-1.5 with the "full" strategy keeps CLIP's CLS token before the grid.
  layout = ImageLayout(image_token_id=IMG, bos_token_id=BOS, grid=(1, 2), base_first=False)
  ids, mask = _batch([[BOS, IMG, IMG, IMG, TXT]])
  _, meta = select_tokens(ids, mask, np.array([0]), layout, "image")
  np.testing.assert_array_equal(meta["position"], [1, 2, 3])
  np.testing.assert_array_equal(meta["patch"], [-1, 0, 1])


@pytest.mark.parametrize("mode, kinds", [("base_patches", {0}), ("image", {0, 1}), ("text", {2})])
def test_modes_keep_their_kinds(mode, kinds):
  layout = ImageLayout(image_token_id=IMG, bos_token_id=BOS, grid=(1, 1), base_first=True)
  ids, mask = _batch([[BOS, TXT, IMG, IMG, TXT], [BOS, IMG, IMG]])
  _, meta = select_tokens(ids, mask, np.array([0, 1]), layout, mode)
  assert set(meta["kind"].tolist()) == kinds


def test_too_few_image_tokens_is_an_error():
  layout = ImageLayout(image_token_id=IMG, bos_token_id=BOS, grid=(2, 2), base_first=True)
  ids, mask = _batch([[BOS, IMG, IMG]])
  with pytest.raises(TokenError, match="input 3 has 2 image tokens, fewer than the 4"):
    select_tokens(ids, mask, np.array([3]), layout, "all")


def test_text_tokens_skip_bos_padding_and_image_tokens():
  layout = ImageLayout(image_token_id=IMG, bos_token_id=BOS, grid=(1, 1), base_first=True)
  ids, mask = _batch([[BOS, TXT, IMG, IMG, 6], [BOS, IMG, 7]])
  assert text_tokens(ids, mask, layout) == [[[1, TXT], [4, 6]], [[2, 7]]]
