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

import dataclasses
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import google_crc32c
import ml_dtypes
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

# What each stored dtype name is on disk: bfloat16 has no numpy dtype, so its bits go as uint16;
# an fp8 row is d_model float8_e4m3fn bytes then its float32 scale's 4 bytes, as uint8.
FP8 = "float8_e4m3fn"
_DISK_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2"),
                FP8: np.dtype("u1")}
DTYPES = tuple(_DISK_DTYPES)  # the dtype names a store may have
_FP8_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448
SCALE_BYTES = 4
_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0}


class StoreError(ValueError):
  """A store that is missing, corrupted, or does not match what the caller asked for."""


from sae_jax.store import location  # noqa: E402 (it imports StoreError)
from sae_jax.store.location import absolute, is_remote, join, open_location  # noqa: E402


def disk_dtype(dtype: str) -> np.dtype:
  if dtype not in _DISK_DTYPES:
    raise StoreError(f"unsupported store dtype {dtype!r}; expected one of {sorted(_DISK_DTYPES)}")
  return _DISK_DTYPES[dtype]


def disk_width(dtype: str, d_model: int) -> int:
  """Columns of a stored row: d_model, plus the scale's bytes for fp8."""
  return d_model + SCALE_BYTES if dtype == FP8 else d_model


def to_disk(acts: np.ndarray, dtype: str) -> np.ndarray:
  """Casts activations to the stored representation (bfloat16 -> its uint16 bits; fp8 -> each
  row divided by max|row| / 448, so that its largest value is fp8's largest, then the scale)."""
  if dtype == FP8:
    scale = np.abs(acts).max(axis=1, keepdims=True).astype(np.float32) / np.float32(_FP8_MAX)
    scale[scale == 0] = 1
    q = (acts.astype(np.float32) / scale).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    return np.ascontiguousarray(np.concatenate([q, scale.astype("<f4").view(np.uint8)], axis=1))
  if dtype == "bfloat16":
    return np.ascontiguousarray(acts.astype(ml_dtypes.bfloat16)).view(np.uint16)
  return np.ascontiguousarray(acts.astype(disk_dtype(dtype)))


def from_disk(raw: np.ndarray, dtype: str) -> np.ndarray:
  """The inverse of `to_disk`: a view without copying, but fp8 rows decoded to float32."""
  if dtype == FP8:
    q = raw[:, :-SCALE_BYTES].view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    return q * np.ascontiguousarray(raw[:, -SCALE_BYTES:]).view("<f4")
  return raw.view(ml_dtypes.bfloat16) if dtype == "bfloat16" else raw


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


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(chunk):
      digest.update(block)
  return digest.hexdigest()


def _tmp_name(path: Path) -> Path:
  # One temp name per process: several harvest workers may commit the same file at once.
  return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write_bytes(path: Path, data: bytes) -> None:
  """Writes `data` to `path` so that readers see the old file or the whole new one, never a part."""
  tmp = _tmp_name(path)
  with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def atomic_write_with(path: Path, write: Callable[[Path], None]) -> None:
  """`write(tmp)` then a rename, as atomic_write_bytes, for writers that take a path.

  The file keeps the mode a plain open() gives (0666 less the umask): some writers create files
  0600 (safetensors' save_file does), which would hide an export from the other users of a group.
  """
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.unlink(missing_ok=True)
  with open(tmp, "wb"):  # created as open() creates any file, so its mode is the usual one
    pass
  mode = tmp.stat().st_mode & 0o777
  write(tmp)
  os.chmod(tmp, mode)
  with open(tmp, "rb") as f:
    os.fsync(f.fileno())
  os.replace(tmp, path)


def json_bytes(obj: Any) -> bytes:
  return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def npy_bytes(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  np.save(buffer, array, allow_pickle=False)
  return buffer.getvalue()


def atomic_write_json(path: Path, obj: Any) -> None:
  atomic_write_bytes(path, json_bytes(obj))


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
  tmp = _tmp_name(path)
  with open(tmp, "wb") as f:
    np.save(f, array, allow_pickle=False)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def chunk_bounds(chunks: dict, row_bytes: int, rows: int) -> list[tuple[int, int]]:
  """The byte ranges [lo, hi) of an activations file that `chunks` checks: header, then chunks."""
  offset, step = chunks["offset"], chunks["rows"] * row_bytes
  end = offset + rows * row_bytes
  return [(0, offset)] + [(lo, min(lo + step, end)) for lo in range(offset, end, step)]


def _shard_files(index: int) -> dict[str, str]:
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
    files = _shard_files(index)
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


def manifest_json(header: dict, shards: Sequence[ShardInfo], complete: bool) -> dict:
  return {
      "format": FORMAT_NAME, "version": FORMAT_VERSION, **header,
      "rows": sum(s.rows for s in shards),
      "images": sum(s.num_inputs - len(s.bad_images) for s in shards), "complete": complete,
      "bad_images": [b for s in shards for b in s.bad_images],
      "shards": [s.to_json() for s in shards],
  }


class Store:
  """Read side: checked ranged reads of rows, global row indexing, the image table, verification;
  nothing of a shard is kept once read."""

  def __init__(self, path: str | os.PathLike, *, verify: bool = False, allow_incomplete: bool = False):
    self.path = path if is_remote(path) else Path(path)
    self.location = open_location(path)
    manifest_path = join(self.path, MANIFEST)
    text = self.location.read(MANIFEST)
    if text is None:
      from sae_jax.store import parts  # imports this module
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
