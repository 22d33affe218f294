"""Files written so that a reader sees the old version or the whole new one, never a part; and
their hashes. Every package writes its outputs through these (stores, checkpoints' records,
exports, reports)."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(chunk):
      digest.update(block)
  return digest.hexdigest()


def tmp_name(path: Path) -> Path:
  # One temp name per process: several harvest workers may commit the same file at once.
  return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write_bytes(path: Path, data: bytes) -> None:
  """Writes `data` to `path` so that readers see the old file or the whole new one, never a part."""
  tmp = tmp_name(path)
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
  tmp = tmp_name(path)
  with open(tmp, "wb") as f:
    np.save(f, array, allow_pickle=False)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
