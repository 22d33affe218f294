"""Writes a store shard by shard; a reopened writer resumes after the last committed shard."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from sae_jax.files import json_bytes, npy_bytes
from sae_jax.store.codecs import disk_dtype, to_disk
from sae_jax.store.format import (MANIFEST, META_DTYPE, ShardInfo, StoreError, chunk_checksums,
                                  manifest_json, shard_files)
from sae_jax.store.location import is_remote, open_location



class StoreWriter:
  """Appends shards to a store; reopening with the same header resumes after the last shard.

  `header` holds everything that defines the store's content (model, hookpoint, layer, d_model,
  dtype and the harvest settings). Reopening an existing store with a different header raises,
  so that two runs with different flags are never mixed in one store.
  """

  def __init__(self, path: str | os.PathLike, header: dict):
    self.path = path if is_remote(path) else Path(path)
    self.location = open_location(path)
    for key in ("model", "hookpoint", "layer", "d_model", "dtype", "settings"):
      if key not in header:
        raise StoreError(f"store header lacks {key!r}")
    disk_dtype(header["dtype"])
    self.header = json.loads(json.dumps(header))  # normalise (tuples -> lists) for comparison
    existing = self.location.read(MANIFEST)
    if existing is not None:
      manifest = json.loads(existing)
      old = {k: manifest.get(k) for k in self.header}
      if old != self.header:
        diff = {k: (old[k], self.header[k]) for k in self.header if old[k] != self.header[k]}
        raise StoreError(
            f"{self.path} holds a store made with other settings (existing vs requested: {diff}); "
            "use another --out or delete it")
      self.shards = [ShardInfo.from_json(s) for s in manifest["shards"]]
      self.complete = manifest.get("complete", False)
    else:
      self.shards = []
      self.complete = False
      self._write_manifest()

  @property
  def rows(self) -> int:
    return sum(s.rows for s in self.shards)

  @property
  def inputs_done(self) -> int:
    """How many input images the committed shards cover: where a resumed harvest starts."""
    return sum(s.num_inputs for s in self.shards)

  @property
  def images_done(self) -> int:
    """How many image ids (good images) the committed shards hold."""
    return self.inputs_done - sum(len(s.bad_images) for s in self.shards)

  def write_shard(self, acts: np.ndarray, meta: np.ndarray, images: Sequence[dict],
                  num_inputs: int, bad_images: Sequence[dict] = ()) -> ShardInfo:
    """Commits one shard: `acts` [rows, d_model], `meta` [rows] of META_DTYPE, its image records."""
    if self.complete:
      raise StoreError(f"{self.path} is already complete")
    d_model = self.header["d_model"]
    if acts.ndim != 2 or acts.shape[1] != d_model:
      raise StoreError(f"shard activations have shape {acts.shape}, expected [rows, {d_model}]")
    if meta.dtype != META_DTYPE or meta.shape != (acts.shape[0],):
      raise StoreError(f"shard metadata must be [{acts.shape[0]}] of {META_DTYPE}")
    index = len(self.shards)
    files = shard_files(index)
    lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in images)
    disk = to_disk(acts, self.header["dtype"])
    contents = {"acts": npy_bytes(disk), "meta": npy_bytes(meta), "images": lines.encode()}
    for kind, data in contents.items():
      self.location.write(files[kind], data)
    info = ShardInfo(
        index=index, rows=int(acts.shape[0]), first_row=self.rows, first_image=self.inputs_done,
        num_inputs=int(num_inputs), files=files,
        sha256={k: hashlib.sha256(data).hexdigest() for k, data in contents.items()},
        bad_images=tuple(bad_images),
        chunks=chunk_checksums(contents["acts"], disk.shape[1] * disk.itemsize, len(disk)))
    self.shards.append(info)
    self._write_manifest()
    return info

  def finish(self) -> None:
    self.complete = True
    self._write_manifest()

  def _write_manifest(self) -> None:
    self.location.write(MANIFEST, json_bytes(manifest_json(self.header, self.shards,
                                                           self.complete)))
