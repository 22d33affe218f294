"""Which token positions of a batch become store rows, and their metadata.

Every input holds one image. The processor expands its `<image>` token into the image's features:
  * LLaVA-1.5: the base grid only (h*w tokens; a CLS token first if the model keeps it, "full").
  * LLaVA-NeXT / OneVision: the base grid FIRST, then the anyres tiles with an image-newline token
    after each row (`pack_image_features` concatenates `(base_image_feature, tiles)`).
So the base grid is the first h*w image tokens (anyres) or the last h*w (single crop), and patch p
of the base grid (row-major, as CLIP flattens it) is the p-th of those.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sae_jax.store import KIND_IMAGE_BASE, KIND_IMAGE_OTHER, KIND_TEXT, META_DTYPE

TOKEN_MODES = {
    "base_patches": (KIND_IMAGE_BASE,),
    "image": (KIND_IMAGE_BASE, KIND_IMAGE_OTHER),
    "text": (KIND_TEXT,),
    "all": (KIND_IMAGE_BASE, KIND_IMAGE_OTHER, KIND_TEXT),
}


class TokenError(ValueError):
  """The tokens of an input do not have the layout the model's class implies."""


@dataclasses.dataclass(frozen=True)
class ImageLayout:
  image_token_id: int
  bos_token_id: int | None
  grid: tuple[int, int]  # base grid (rows, cols): image_size // patch_size each
  base_first: bool  # anyres classes put the base grid first; single-crop LLaVA puts it last


def select_tokens(input_ids: np.ndarray, attention_mask: np.ndarray, image_ids: np.ndarray,
                  layout: ImageLayout, mode: str) -> tuple[np.ndarray, np.ndarray]:
  """Rows to store from a [batch, seq] batch: (batch index [n], metadata [n] of META_DTYPE).

  Rows come in input order, then position order. Padding (attention mask 0) and BOS are never
  selected; positions are those of the unpadded sequence (the batch is right-padded).
  """
  kinds_kept = np.array(TOKEN_MODES[mode])
  num_base = layout.grid[0] * layout.grid[1]
  batch_index, metas = [], []
  for b in range(input_ids.shape[0]):
    ids = input_ids[b]
    positions = np.flatnonzero(attention_mask[b].astype(bool) & (ids != layout.bos_token_id))
    is_image = ids[positions] == layout.image_token_id
    image_at = np.flatnonzero(is_image)
    if len(image_at) < num_base:
      raise TokenError(f"input {int(image_ids[b])} has {len(image_at)} image tokens, fewer than "
                       f"the {num_base} of the base grid {layout.grid}")
    base_at = image_at[:num_base] if layout.base_first else image_at[len(image_at) - num_base:]
    kind = np.where(is_image, KIND_IMAGE_OTHER, KIND_TEXT).astype(np.uint8)
    kind[base_at] = KIND_IMAGE_BASE
    patch = np.full(len(positions), -1, np.int32)
    patch[base_at] = np.arange(num_base, dtype=np.int32)
    keep = np.isin(kind, kinds_kept)
    meta = np.zeros(int(keep.sum()), META_DTYPE)
    meta["image_id"] = image_ids[b]
    meta["position"] = positions[keep]
    meta["kind"] = kind[keep]
    meta["patch"] = patch[keep]
    batch_index.append(np.full(len(meta), b, np.int64))
    metas.append(meta)
  return np.concatenate(batch_index), np.concatenate(metas)


def text_tokens(input_ids: np.ndarray, attention_mask: np.ndarray,
                layout: ImageLayout) -> list[list[list[int]]]:
  """Per input of a [batch, seq] batch, [position, token id] of every text token (not padding,
  BOS or an image token), for the image record: `interpret` decodes a text row's context from it
  with the model's tokenizer, since sae_jax has none. A few dozen pairs per prompt."""
  out = []
  for ids, mask in zip(input_ids, attention_mask):
    at = np.flatnonzero(mask.astype(bool) & (ids != layout.bos_token_id)
                        & (ids != layout.image_token_id))
    out.append([[int(p), int(ids[p])] for p in at])
  return out


# How the base grid covers an image: "squash", the whole image resized to a square (LLaVA-NeXT's
# and OneVision's base image), or "center_crop", the centre square of a shortest-edge resize
# (CLIP's processor, LLaVA-1.5). Harvest records it per image; interpret.visual maps with it.
VIEWS = ("squash", "center_crop")


def view_of_processor(image_processor) -> str:
  """center_crop for a processor that crops the centre of a plain resize (CLIP's, LLaVA-1.5);
  squash for an any-res one (LLaVA-NeXT, OneVision: their base image is the squashed whole)."""
  if getattr(image_processor, "image_grid_pinpoints", None):
    return "squash"
  return "center_crop" if getattr(image_processor, "do_center_crop", False) else "squash"
