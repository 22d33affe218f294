"""Where a store lives: a local folder, or a prefix of a gs:// or s3:// bucket.

Buckets go through tensorstore's kvstore (installed with orbax-checkpoint already; GCS, S3 and
local drivers, asynchronous: a read is a future, so many are in flight without a thread each).
An object is written by one PUT, so it appears whole or not at all: no temporary names needed. The
usual emulator variables are honoured: STORAGE_EMULATOR_HOST for gs://, AWS_ENDPOINT_URL (or
AWS_ENDPOINT_URL_S3) for s3://. Nothing is written into os.environ. The S3 endpoint goes in the
kvstore spec; tensorstore's GCS driver has no spec member for one (up to 0.1.86 at least: it takes
its URL from its flag --tensorstore_gcs_http_url, else from TENSORSTORE_GCS_HTTP_URL), so for
STORAGE_EMULATOR_HOST the library sets that flag through `tensorstore.parse_tensorstore_flags`.
Credentials stay tensorstore's to find; it would send real ones to the emulator, so an emulator
needs GOOGLE_AUTH_TOKEN_FOR_TESTING set by whoever starts the command (a one-line error says so).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Iterator

import google_crc32c
import numpy as np

from sae_jax.files import atomic_write_bytes
from sae_jax.store.format import StoreError

REMOTE_SCHEMES = ("gs://", "s3://")
# Bytes per read when a whole file is hashed or copied: with one read ahead, what a stream holds.
_BLOCK = 1 << 23


def sha256(location: "Local | Bucket", rel: str) -> str | None:
  """The sha256 of a file of `location`, or None if it is missing."""
  digests = checksums(location, rel, [])
  return None if digests is None else digests[0]


def checksums(location: "Local | Bucket", rel: str, bounds: list[tuple[int, int]]
              ) -> tuple[str, list[int]] | None:
  """The sha256 of a file of `location` and the CRC32C of each of its byte ranges `bounds`
  (consecutive, from byte 0; the file may end inside them), in one streamed read; None if it is
  missing."""
  blocks = location.blocks(rel)
  if blocks is None:
    return None
  whole, pieces = hashlib.sha256(), [0] * len(bounds)
  at, piece = 0, 0
  for block in blocks:
    whole.update(block)
    view = np.frombuffer(block, np.uint8)  # read-only, as google_crc32c wants it; no copies
    while len(view) and piece < len(bounds):
      take = min(len(view), bounds[piece][1] - at)
      pieces[piece] = google_crc32c.extend(pieces[piece], view[:take])
      view, at = view[take:], at + take
      if at == bounds[piece][1]:
        piece += 1
  return whole.hexdigest(), pieces


def _status(e: Exception) -> str:
  """The absl status code of a tensorstore error: its Python exception carries the status as the
  code that starts its message ("OUT_OF_RANGE: ..."), and nothing else does."""
  return str(e).split(":", 1)[0].strip()


class LocationError(StoreError):
  """A store location that cannot be read or written; the message names the path."""


def _point_gcs_driver(url: str) -> None:
  """Points tensorstore's GCS driver (which reads the URL when a bucket is opened) at
  STORAGE_EMULATOR_HOST, else at TENSORSTORE_GCS_HTTP_URL or Google's endpoint: the flag is
  process-wide, so every opening sets it, and a later bucket goes where the environment says now."""
  import tensorstore as ts
  emulator = os.environ.get("STORAGE_EMULATOR_HOST")
  if emulator and not os.environ.get("GOOGLE_AUTH_TOKEN_FOR_TESTING"):
    raise LocationError(f"{url}: STORAGE_EMULATOR_HOST is set but GOOGLE_AUTH_TOKEN_FOR_TESTING "
                        "is not: set it (any value, e.g. emulator), else tensorstore sends this "
                        "host's Google credentials to the emulator")
  if emulator:
    endpoint = emulator if "://" in emulator else f"http://{emulator}"
  else:
    endpoint = os.environ.get("TENSORSTORE_GCS_HTTP_URL") or "https://storage.googleapis.com"
  ts.parse_tensorstore_flags(["sae_jax", f"--tensorstore_gcs_http_url={endpoint}"])


def is_remote(path) -> bool:
  return str(path).startswith(REMOTE_SCHEMES)


def join(path, *parts: str):
  """`path / parts` for a local path or a bucket URL."""
  if is_remote(path):
    return "/".join([str(path).rstrip("/"), *parts])
  return Path(path).joinpath(*parts)


def absolute(path) -> str:
  """A local path made absolute, a URL as it is: what run records name a store by."""
  return str(path) if is_remote(path) else str(Path(path).absolute())


def open_location(path) -> "Local | Bucket":
  return Bucket(str(path)) if is_remote(path) else Local(Path(path))


class Local:
  """A folder: files written to a temporary name and renamed."""

  def __init__(self, root: Path):
    self.root = root

  def url(self, rel: str) -> str:
    return str(self.root / rel)

  def read(self, rel: str) -> bytes | None:
    try:
      return (self.root / rel).read_bytes()
    except FileNotFoundError:
      return None

  asynchronous = False  # a read blocks its thread: readers keep a thread per read in flight

  def start_read_into(self, rel: str, offset: int, out: memoryview) -> Callable[[], None]:
    """`read_into`, run by the returned function (a file read blocks: nothing to start)."""
    return lambda: self.read_into(rel, offset, out)

  def read_into(self, rel: str, offset: int, out: memoryview) -> None:
    with open(self.root / rel, "rb", buffering=0) as f:
      while out:
        got = os.preadv(f.fileno(), [out], offset)
        if not got:
          raise LocationError(f"{self.url(rel)} ends at byte {offset}: it is truncated")
        out, offset = out[got:], offset + got

  def blocks(self, rel: str) -> Iterator[bytes] | None:
    """The file in consecutive blocks, or None if it is missing."""
    try:
      f = open(self.root / rel, "rb")
    except FileNotFoundError:
      return None

    def read():
      with f:
        while block := f.read(_BLOCK):
          yield block
    return read()

  def write(self, rel: str, data: bytes) -> None:
    (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(self.root / rel, data)

  def subfolders(self, rel: str) -> list[str]:
    folder = self.root / rel
    return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []

  def mmap_npy(self, rel: str) -> np.ndarray:
    return np.load(self.root / rel, mmap_mode="r", allow_pickle=False)


class Bucket:
  """A prefix of a GCS or S3 bucket, through tensorstore."""

  def __init__(self, url: str):
    import tensorstore as ts  # only stores in buckets need it
    self._ts = ts
    self.root = url.rstrip("/")
    scheme, _, rest = self.root.partition("://")
    bucket, _, prefix = rest.partition("/")
    if not bucket:
      raise LocationError(f"{url}: no bucket name")
    spec = {"driver": "gcs" if scheme == "gs" else "s3", "bucket": bucket,
            "path": prefix + "/" if prefix else ""}
    if scheme == "gs":
      _point_gcs_driver(url)
    if scheme == "s3":
      endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
      if endpoint:
        spec["endpoint"] = endpoint
      spec["aws_region"] = (os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
                            or "us-east-1")
    try:
      self.kv = ts.KvStore.open(spec).result()
    except Exception as e:
      raise self._error(url, e) from e

  def url(self, rel: str) -> str:
    return f"{self.root}/{rel}"

  def _error(self, url: str, e: Exception) -> LocationError:
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return LocationError(f"{url}: {reason}")

  def _read(self, rel: str, byte_range: slice | None = None, *, to_end: bool = False):
    """A read; a range past the object's end is cut at the end if `to_end`, else refused."""
    return self._result(rel, self.kv.read(rel, byte_range=byte_range), byte_range, to_end=to_end)

  def _result(self, rel: str, future, byte_range: slice | None, *, to_end: bool = False):
    """The result of a read started as `future`, as `_read` returns it."""
    try:
      return future.result()
    except Exception as e:
      if _status(e) != "OUT_OF_RANGE":
        raise self._error(self.url(rel), e) from e
      if not to_end:
        raise LocationError(f"{self.url(rel)} ends before byte {byte_range.stop}: it is "
                            "truncated") from e
      return self._read(rel, slice(byte_range.start, None))

  def read(self, rel: str) -> bytes | None:
    result = self._read(rel)
    return bytes(result.value) if result.state == "value" else None

  asynchronous = True  # a read is a tensorstore future: many in flight without a thread each

  def start_read_into(self, rel: str, offset: int, out: memoryview) -> Callable[[], None]:
    """Starts reading bytes [offset, offset + len(out)) of `rel`; the returned function waits for
    them and copies them into `out`."""
    byte_range = slice(offset, offset + len(out))
    future = self.kv.read(rel, byte_range=byte_range)
    return lambda: self._copy(rel, self._result(rel, future, byte_range), offset, out)

  def read_into(self, rel: str, offset: int, out: memoryview) -> None:
    self.start_read_into(rel, offset, out)()

  def _copy(self, rel: str, result, offset: int, out: memoryview) -> None:
    if result.state != "value":
      raise LocationError(f"{self.url(rel)} is missing")
    if len(result.value) != len(out):
      raise LocationError(f"{self.url(rel)} ends before byte {offset + len(out)}: it is truncated")
    out[:] = result.value

  def blocks(self, rel: str) -> Iterator[bytes] | None:
    """The object in consecutive ranged reads, or None if it is missing."""
    first = self._read(rel, slice(0, _BLOCK), to_end=True)
    if first.state != "value":
      return None

    def read():
      block, offset = bytes(first.value), 0
      while len(block) == _BLOCK:
        offset += _BLOCK
        ahead = self.kv.read(rel, byte_range=slice(offset, offset + _BLOCK))  # in flight meanwhile
        yield block
        block = bytes(self._result(rel, ahead, slice(offset, offset + _BLOCK), to_end=True).value)
      yield block
    return read()

  def write(self, rel: str, data: bytes) -> None:
    try:
      self.kv.write(rel, data).result()
    except Exception as e:
      raise self._error(self.url(rel), e) from e

  def subfolders(self, rel: str) -> list[str]:
    prefix = rel.rstrip("/") + "/"
    try:
      keys = self.kv.list(self._ts.KvStore.KeyRange(prefix, prefix[:-1] + "0")).result()
    except Exception as e:
      reason = str(self._error("", e))[2:]
      raise LocationError(f"{self.root}: cannot list it ({reason}); does the bucket exist, and "
                          "may these credentials read it?") from e
    return sorted({k.decode()[len(prefix):].split("/")[0] for k in keys
                   if "/" in k.decode()[len(prefix):]})

  def mmap_npy(self, rel: str) -> np.ndarray:
    """Not a memory map: the whole object, read once."""
    import io
    data = self.read(rel)
    if data is None:
      raise LocationError(f"{self.url(rel)} is missing")
    return np.load(io.BytesIO(data), allow_pickle=False)
