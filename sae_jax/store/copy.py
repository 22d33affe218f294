"""Copies a store file by file, checking every file on the way: down from a bucket to a local
folder, up from a folder to a bucket (`--copy_to=gs://...`), or between any two locations.

Each file's sha256 is compared with the manifest's as it is read. Into a folder a file is streamed
to a temporary name and renamed; into a bucket it is one PUT (so the copy holds one file in memory
at a time, and an object is whole or absent). The manifest goes last, so the copy is a store only
once every file is in place. Rerunning skips the files already copied whole.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import tqdm

from sae_jax.files import json_bytes
from sae_jax.store import MANIFEST, Store, StoreError, open_location
from sae_jax.store.location import Local, sha256


def copy_store(store: Store, dest: str | os.PathLike) -> int:
  """Copies `store` to `dest` (a folder or a bucket URL); returns the bytes copied."""
  if str(dest).rstrip("/") == str(store.path).rstrip("/"):
    raise StoreError(f"--copy_to={dest} is the store itself")
  target = open_location(dest)
  copied = 0
  files = [(s, kind, rel) for s in store.shards for kind, rel in s.files.items()]
  for s, kind, rel in tqdm.tqdm(files, unit="file", dynamic_ncols=True, desc="copy"):
    if sha256(target, rel) != s.sha256[kind]:
      copied += _copy_file(store, s.index, rel, s.sha256[kind], target)
  target.write(MANIFEST, json_bytes(store.manifest))
  return copied


def _copy_file(store: Store, shard: int, rel: str, expected: str, target) -> int:
  blocks = store.location.blocks(rel)
  if blocks is None:
    raise StoreError(f"shard {shard} of {store.path}: file {rel} is missing")
  corrupted = StoreError(f"shard {shard} of {store.path}: {rel} is corrupted (sha256 does not "
                         "match the manifest); nothing of it was copied")
  if not isinstance(target, Local):  # one PUT: the whole file, checked before it is sent
    data = b"".join(blocks)
    if hashlib.sha256(data).hexdigest() != expected:
      raise corrupted
    target.write(rel, data)
    return len(data)
  path = Path(target.root) / rel
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
      raise corrupted
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)
  return copied
