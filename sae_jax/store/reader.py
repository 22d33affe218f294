"""Reads a store: checked ranged reads of rows, the image table, verification."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from sae_jax.store import location, parts
from sae_jax.store.codecs import disk_dtype, disk_width, from_disk
from sae_jax.store.format import (FORMAT_NAME, KIND_NAMES, MANIFEST, META_DTYPE, READ_VERSIONS,
                                  ShardInfo, StoreError, chunk_bounds, crc32c)
from sae_jax.store.location import is_remote, join, open_location


_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0}



class Store:
  """Read side: checked ranged reads of rows, global row indexing, the image table, verification;
  nothing of a shard is kept once read."""

  def __init__(self, path: str | os.PathLike, *, verify: bool = False, allow_incomplete: bool = False):
    self.path = path if is_remote(path) else Path(path)
    self.location = open_location(path)
    manifest_path = join(self.path, MANIFEST)
    text = self.location.read(MANIFEST)
    if text is None:
      if self.location.subfolders(parts.PARTS_DIR):
        raise StoreError(f"{self.path} is a multi-worker store not committed yet: "
                         f"{parts.status(self.path)}")
      raise StoreError(f"{self.path} is not an activation store: {manifest_path} is missing")
    try:
      self.manifest = json.loads(text)
    except json.JSONDecodeError as e:
      raise StoreError(f"{manifest_path} is not valid JSON: {e}") from e
    if self.manifest.get("format") != FORMAT_NAME:
      raise StoreError(f"{manifest_path} has format {self.manifest.get('format')!r}, "
                       f"expected {FORMAT_NAME!r}")
    if self.manifest.get("version") not in READ_VERSIONS:
      raise StoreError(f"{manifest_path} has version {self.manifest.get('version')}, "
                       f"this code reads versions {list(READ_VERSIONS)}")
    if not allow_incomplete and not self.manifest.get("complete"):
      raise StoreError(f"{self.path} is incomplete (its harvest has not finished); rerun the "
                       "harvest with the same flags to finish it")
    self.shards = [ShardInfo.from_json(s) for s in self.manifest["shards"]]
    self.d_model = int(self.manifest["d_model"])
    self.dtype = self.manifest["dtype"]
    self.rows = sum(s.rows for s in self.shards)
    self._ends = np.cumsum([s.rows for s in self.shards])
    self.width = disk_width(self.dtype, self.d_model)
    self.row_bytes = self.width * disk_dtype(self.dtype).itemsize
    self._offsets: dict[int, int] = {}  # where each shard's rows begin in its .npy, once read
    if verify:
      self.verify()

  def __repr__(self) -> str:
    return f"Store(rows={self.rows}, d_model={self.d_model}, dtype={self.dtype})"

  def __len__(self) -> int:
    return self.rows

  def verify(self) -> None:
    """Checks every shard file's sha256 (and each chunk's CRC32C, where the manifest has them) and
    shape, streaming; raises StoreError naming the first bad file (and chunk)."""
    for s in self.shards:
      self.acts_offset(s.index)  # the header: shape and dtype
      for kind in s.files:
        if kind != "meta":  # shard_meta checks it as it reads it
          self.check_file(s.index, kind)
      if self.shard_meta(s.index).shape != (s.rows,):
        raise StoreError(f"shard {s.index} of {self.path}: {s.files['meta']} does not hold the "
                         f"manifest's {s.rows} rows")

  def check_file(self, shard: int, kind: str) -> None:
    """Raises StoreError naming the file (and, with per-chunk checksums, the first bad chunk's
    bytes) if one shard file differs from the manifest; reads it once, a block at a time."""
    info = self.shards[shard]
    rel = info.files[kind]
    chunks = info.chunks if kind == "acts" else None
    bounds, expected = [], []
    if chunks is not None:
      bounds = chunk_bounds(chunks, self.row_bytes, info.rows)
      expected = [chunks["header_crc32c"], *chunks["crc32c"]]
    digests = location.checksums(self.location, rel, bounds)
    if digests is None:
      raise StoreError(f"shard {shard} of {self.path}: file {rel} is missing")
    whole, pieces = digests
    for (lo, hi), got, want in zip(bounds, pieces, expected):
      if got != want:
        raise self._corrupted(shard, rel, lo, hi)
    if whole != info.sha256[kind]:
      raise StoreError(f"shard {shard} of {self.path}: {rel} is corrupted (sha256 does not match "
                       "the manifest); harvest this store again")

  def _corrupted(self, shard: int, rel: str, lo: int, hi: int) -> StoreError:
    return StoreError(f"shard {shard} of {self.path}: {rel} is corrupted at bytes [{lo}, {hi}) "
                      "(CRC32C does not match the manifest); harvest this store again")

  def acts_offset(self, shard: int) -> int:
    """Where the rows of a shard's activations begin in its .npy file, after checking its header
    (against the manifest's shape and dtype, and its checksum where the manifest has one)."""
    if shard not in self._offsets:
      info, dtype = self.shards[shard], disk_dtype(self.dtype)
      rel = info.files["acts"]
      head = bytearray(12)  # magic, version and header length (2 bytes in v1, 4 in v2)
      self._read_into(shard, rel, 0, memoryview(head))
      size = (10 + int.from_bytes(head[8:10], "little") if head[6] == 1 else
              12 + int.from_bytes(head[8:12], "little"))
      head = bytearray(size)
      self._read_into(shard, rel, 0, memoryview(head))
      if info.chunks is not None and crc32c(bytes(head)) != info.chunks["header_crc32c"]:
        raise self._corrupted(shard, rel, 0, size)
      with io.BytesIO(bytes(head)) as f:
        read_header = _NPY_HEADERS.get(np.lib.format.read_magic(f))
        if read_header is None:
          raise StoreError(f"shard {shard} of {self.path}: {rel} is not a .npy file of version "
                           "1 or 2")
        shape, fortran, found = read_header(f)
      if shape != (info.rows, self.width) or fortran or found != dtype:
        raise StoreError(f"shard {shard} of {self.path}: {rel} holds {shape} {found}, not the "
                         f"manifest's {info.rows} x {self.width} {dtype}")
      self._offsets[shard] = size
    return self._offsets[shard]

  def _read_into(self, shard: int, rel: str, offset: int, out: memoryview) -> None:
    try:
      self.location.read_into(rel, offset, out)
    except StoreError as e:
      raise StoreError(f"shard {shard}: {e}") from e
    except OSError as e:
      raise StoreError(f"shard {shard} of {self.path}: cannot read {rel}: {e}") from e

  def read_rows(self, shard: int, start: int, stop: int, out: np.ndarray | None = None
                ) -> np.ndarray:
    """Rows [start, stop) of a shard as stored ([n, width] of the disk dtype), into `out` if
    given. Where the manifest has per-chunk checksums, the checked chunks that hold the rows are
    read and checked (read into `out` directly when the rows are exactly whole chunks)."""
    return self.start_rows(shard, start, stop, out)()

  def start_rows(self, shard: int, start: int, stop: int, out: np.ndarray | None = None
                 ) -> Callable[[], np.ndarray]:
    """`read_rows` begun: the read is in flight (from a bucket; a file is read when finished), and
    the returned function waits for it, checks it and returns the rows."""
    info = self.shards[shard]
    rel, offset = info.files["acts"], self.acts_offset(shard)
    if out is None:
      out = np.empty((stop - start, self.width), disk_dtype(self.dtype))
    per = info.chunks["rows"] if info.chunks is not None else 1
    lo, hi = start // per * per, min(-(-stop // per) * per, info.rows)
    whole = out if (lo, hi) == (start, stop) else np.empty((hi - lo, self.width), out.dtype)
    try:
      read = self.location.start_read_into(rel, offset + lo * self.row_bytes,
                                           memoryview(whole).cast("B"))
    except StoreError as e:
      raise StoreError(f"shard {shard}: {e}") from e

    def finish() -> np.ndarray:
      try:
        read()
      except StoreError as e:
        raise StoreError(f"shard {shard}: {e}") from e
      except OSError as e:
        raise StoreError(f"shard {shard} of {self.path}: cannot read {rel}: {e}") from e
      for i, at in enumerate(range(0, hi - lo, per) if info.chunks is not None else ()):
        if crc32c(whole[at:at + per]) != info.chunks["crc32c"][lo // per + i]:
          first = offset + (lo + at) * self.row_bytes
          raise self._corrupted(shard, rel, first,
                                first + len(whole[at:at + per]) * self.row_bytes)
      if whole is not out:
        out[:] = whole[start - lo:stop - lo]
      return out
    return finish

  def shard_acts(self, index: int) -> np.ndarray:
    """The activations of one shard, read whole and checked, [rows, d_model] (bfloat16 viewed as
    such); for small stores and tests: commands read ranges (`read_rows`)."""
    return from_disk(self.read_rows(index, 0, self.shards[index].rows), self.dtype)

  def shard_meta(self, index: int) -> np.ndarray:
    """The metadata of one shard, read whole (it is small) and checked as it is read."""
    return np.load(io.BytesIO(self._checked_file(index, "meta")), allow_pickle=False)

  def _checked_file(self, index: int, kind: str) -> bytes:
    info = self.shards[index]
    data = self.location.read(info.files[kind])
    if data is None:
      raise StoreError(f"shard {index} of {self.path}: file {info.files[kind]} is missing")
    if hashlib.sha256(data).hexdigest() != info.sha256[kind]:
      raise StoreError(f"shard {index} of {self.path}: {info.files[kind]} is corrupted (sha256 "
                       "does not match the manifest); harvest this store again")
    return data

  def locate(self, row: int) -> tuple[int, int]:
    """(shard index, row within shard) of a global row index."""
    if not 0 <= row < self.rows:
      raise IndexError(f"row {row} out of range for a store of {self.rows} rows")
    shard = int(np.searchsorted(self._ends, row, side="right"))
    return shard, row - (int(self._ends[shard - 1]) if shard else 0)

  def __getitem__(self, row: int) -> np.ndarray:
    """One row as float32, read (with its checked chunk) on each call."""
    shard, local = self.locate(int(row))
    return np.asarray(from_disk(self.read_rows(shard, local, local + 1), self.dtype)[0],
                      dtype=np.float32)

  def iter_shards(self) -> Iterator[tuple[ShardInfo, np.ndarray, np.ndarray]]:
    for s in self.shards:
      yield s, self.shard_acts(s.index), self.shard_meta(s.index)

  def meta(self) -> np.ndarray:
    """The metadata of every row, concatenated ([rows] of META_DTYPE)."""
    if not self.shards:
      return np.zeros((0,), META_DTYPE)
    return np.concatenate([self.shard_meta(s.index) for s in self.shards])

  def images(self) -> list[dict]:
    """The image table: one record per image id, in id order."""
    table = []
    for s in self.shards:
      text = self._checked_file(s.index, "images")
      table.extend(json.loads(line) for line in text.decode().splitlines() if line.strip())
    return table

  def summary(self) -> dict:
    kinds = sum((np.bincount(self.shard_meta(s.index)["kind"], minlength=len(KIND_NAMES))
                 for s in self.shards), np.zeros(len(KIND_NAMES), np.int64))
    return {
        "store": str(self.path), "model": self.manifest["model"],
        "hookpoint": self.manifest["hookpoint"], "layer": self.manifest["layer"],
        "d_model": self.d_model, "dtype": self.dtype, "rows": self.rows,
        "images": self.manifest["images"], "shards": len(self.shards),
        "bad_images": len(self.manifest.get("bad_images", [])),
        "complete": bool(self.manifest.get("complete")),
        "rows_by_kind": {KIND_NAMES[i]: int(kinds[i]) for i in KIND_NAMES},
    }
