"""The activation store's format: names, row kinds, the manifest's shard records and the per-chunk
checksums (docs/formats.md)."""

from __future__ import annotations

import dataclasses
import json
from typing import Sequence

import google_crc32c
import numpy as np

FORMAT_NAME = "sae-activation-store"
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)  # version 1: no per-chunk checksums
# Bytes of rows per checked chunk of an activations file: a reader reads whole checked chunks.
CHECK_CHUNK_BYTES = 1 << 20
MANIFEST = "manifest.json"
SHARD_DIR = "shards"

# Token kinds stored per row.
KIND_IMAGE_BASE = 0  # a patch of the base image grid (the paper's 576 tokens for 336 px CLIP)
KIND_IMAGE_OTHER = 1  # any other image token: anyres tiles, image-newline tokens
KIND_TEXT = 2  # a text token of the prompt (BOS and padding are never stored)
KIND_NAMES = {KIND_IMAGE_BASE: "image_base", KIND_IMAGE_OTHER: "image_other", KIND_TEXT: "text"}

META_DTYPE = np.dtype(
    [("image_id", "<i8"), ("position", "<i4"), ("kind", "u1"), ("patch", "<i4")]
)


class StoreError(ValueError):
  """A store that is missing, corrupted, or does not match what the caller asked for."""


def crc32c(data) -> int:
  """The CRC32C of bytes or of a contiguous array (read-only views: google_crc32c wants them)."""
  if isinstance(data, np.ndarray):
    data = data.reshape(-1).view(np.uint8)
    data.flags.writeable = False
  return google_crc32c.value(data)


def chunk_checksums(npy: bytes, row_bytes: int, rows: int) -> dict:
  """`ShardInfo.chunks` of an activations .npy file: its header's CRC32C, and one per chunk of
  `rows` rows of its data (the last chunk may be shorter). CRC32C, not sha256: readers check every
  chunk they read, at ~10 GB/s a core instead of ~1 (whole files keep their sha256)."""
  offset = len(npy) - rows * row_bytes
  chunk_rows = max(1, CHECK_CHUNK_BYTES // row_bytes)
  step = chunk_rows * row_bytes
  return {"offset": offset, "rows": chunk_rows, "header_crc32c": crc32c(npy[:offset]),
          "crc32c": [crc32c(npy[i:i + step]) for i in range(offset, len(npy), step)]}


def chunk_bounds(chunks: dict, row_bytes: int, rows: int) -> list[tuple[int, int]]:
  """The byte ranges [lo, hi) of an activations file that `chunks` checks: header, then chunks."""
  offset, step = chunks["offset"], chunks["rows"] * row_bytes
  end = offset + rows * row_bytes
  return [(0, offset)] + [(lo, min(lo + step, end)) for lo in range(offset, end, step)]


def shard_files(index: int) -> dict[str, str]:
  stem = f"{SHARD_DIR}/{index:05d}"
  return {"acts": f"{stem}.acts.npy", "meta": f"{stem}.meta.npy", "images": f"{stem}.images.jsonl"}


@dataclasses.dataclass(frozen=True)
class ShardInfo:
  index: int
  rows: int
  first_row: int
  first_image: int  # index, in harvest input order, of the shard's first input image
  num_inputs: int  # input images the shard covers, including skipped bad ones
  files: dict[str, str]
  sha256: dict[str, str]
  bad_images: tuple[dict, ...] = ()
  # The activations' per-chunk CRC32Cs (chunk_checksums); None in stores of version 1.
  chunks: dict | None = None

  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    d["bad_images"] = list(self.bad_images)
    if self.chunks is None:
      del d["chunks"]
    return d

  @classmethod
  def from_json(cls, d: dict) -> "ShardInfo":
    d = json.loads(json.dumps(d))  # its own copy: a caller may edit the manifest it came from
    return cls(**{**d, "bad_images": tuple(d.get("bad_images", ()))})


def manifest_json(header: dict, shards: Sequence[ShardInfo], complete: bool) -> dict:
  return {
      "format": FORMAT_NAME, "version": FORMAT_VERSION, **header,
      "rows": sum(s.rows for s in shards),
      "images": sum(s.num_inputs - len(s.bad_images) for s in shards), "complete": complete,
      "bad_images": [b for s in shards for b in s.bad_images],
      "shards": [s.to_json() for s in shards],
  }
