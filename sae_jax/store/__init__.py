"""Activation store: a directory of memory-mappable .npy shards that numpy alone can read.

Layout (the contract between `harvest`, `sae_jax` and `interpret`; see docs/formats.md):

  STORE/manifest.json              format, model, hookpoint, d_model, dtype, rows, settings, shards
  STORE/shards/00000.acts.npy      [rows, d_model] float16 | float32 | uint16 (= bfloat16 bits),
                                   or uint8 [rows, d_model + 4] (fp8 bytes, then a float32 scale)
  STORE/shards/00000.meta.npy      [rows] structured: image_id, position, kind, patch
  STORE/shards/00000.images.jsonl  one record per image of the shard: id, source, prompt, grid

A STORE is a local folder or a gs:// or s3:// URL (sae_jax.store.location). Shards are written to a
temporary name and renamed (in a bucket: one PUT each), and the manifest is rewritten (also
atomically) only after a shard's files are in place, so a store killed at any moment is a valid
prefix of the finished one. A writer reopened with the same settings continues after the last committed shard.

Each shard's activations carry a CRC32C per chunk of rows (format version 2; `ShardInfo.chunks`),
so a reader checks exactly the bytes it reads when it reads them, and memory depends on what is
read at once, never on the store's size: nothing of a shard is kept once read. Stores of version
1 (whole-file checksums only) are still read, each file hashed whole before its first use.

Run `python -m sae_jax.store --store=PATH` to verify every checksum and print a JSON summary.
"""

from __future__ import annotations
# The store's API, from the modules that hold each part: the format, the dtype codecs, where a
# store lives (local, gs://, s3://), the writer and the reader.
from sae_jax.store.codecs import (DTYPES, FP8, SCALE_BYTES, disk_dtype, disk_width, from_disk,
                                  to_disk)
from sae_jax.store.format import (FORMAT_NAME, FORMAT_VERSION, KIND_IMAGE_BASE, KIND_IMAGE_OTHER,
                                  KIND_NAMES, KIND_TEXT, MANIFEST, META_DTYPE, SHARD_DIR, ShardInfo,
                                  StoreError)
from sae_jax.store.location import absolute, is_remote, join, open_location
from sae_jax.store.reader import Store
from sae_jax.store.writer import StoreWriter
