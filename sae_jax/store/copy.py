"""Copies a store (from a bucket, typically) to a local folder, checking every file on the way.

Each file is streamed to a temporary name, its sha256 compared with the manifest's, then renamed;
the manifest goes last, so the copy is a store only once every file is in place. Rerunning skips
the files already copied whole.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import tqdm

from sae_jax.store import MANIFEST, Store, StoreError, is_remote, json_bytes, open_location
from sae_jax.store.location import sha256


def copy_store(store: Store, dest: str | os.PathLike) -> int:
  """Copies `store` into the local folder `dest`; returns the bytes copied."""
  if is_remote(dest):
    raise StoreError(f"--copy_to={dest} must be a local folder")
  target = open_location(dest)
  copied = 0
  files = [(s, kind, rel) for s in store.shards for kind, rel in s.files.items()]
  for s, kind, rel in tqdm.tqdm(files, unit="file", dynamic_ncols=True, desc="copy"):
    if sha256(target, rel) != s.sha256[kind]:
      copied += _copy_file(store, s.index, rel, s.sha256[kind], Path(dest) / rel)
  target.write(MANIFEST, json_bytes(store.manifest))
  return copied


def _copy_file(store: Store, shard: int, rel: str, expected: str, path: Path) -> int:
  blocks = store.location.blocks(rel)
  if blocks is None:
    raise StoreError(f"shard {shard} of {store.path}: file {rel} is missing")
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  digest, copied = hashlib.sha256(), 0
  try:
    with open(tmp, "wb") as f:
      for block in blocks:
        digest.update(block)
        f.write(block)
        copied += len(block)
    if digest.hexdigest() != expected:
      raise StoreError(f"shard {shard} of {store.path}: {rel} is corrupted (sha256 does not "
                       "match the manifest); nothing of it was copied")
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)
  return copied
