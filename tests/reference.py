"""Float64 numpy references of the TopK SAE, the "other way" the tests compute things."""

import numpy as np


def encode_numpy(params: dict[str, np.ndarray], x: np.ndarray, k: int):
  """Reference TopK encode in float64 numpy: (values [B,k], indices [B,k]) sorted by value."""
  pre = np.maximum((x.astype(np.float64) - params["b_dec"]) @ params["W_enc"].T.astype(np.float64)
                   + params["b_enc"], 0.0)
  idx = np.argsort(-pre, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(pre, idx, 1), idx


def decode_numpy(params: dict[str, np.ndarray], values: np.ndarray, indices: np.ndarray):
  return np.einsum("bk,bkd->bd", values, params["W_dec"].astype(np.float64)[indices]) + params["b_dec"]
