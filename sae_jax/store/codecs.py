"""How each stored dtype is written on disk and read back (bfloat16 as uint16 bits, fp8 with a
per-row scale)."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from sae_jax.store.format import StoreError

# What each stored dtype name is on disk: bfloat16 has no numpy dtype, so its bits go as uint16;
# an fp8 row is d_model float8_e4m3fn bytes then its float32 scale's 4 bytes, as uint8.
FP8 = "float8_e4m3fn"
_DISK_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2"),
                FP8: np.dtype("u1")}
DTYPES = tuple(_DISK_DTYPES)  # the dtype names a store may have
_FP8_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448
SCALE_BYTES = 4

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
