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


def saelens_rescaled_numpy(params: dict[str, np.ndarray], x: np.ndarray, k: int):
  """SAELens's TopKSAE with rescale_acts_by_decoder_norm, in float64: (dense z [B,n], x_hat [B,d]).

  As in sae_lens/saes/topk_sae.py: the pre-activations are scaled by the decoder row norms, then
  TopK and ReLU; decoding divides z by the norms again.
  """
  p = {name: v.astype(np.float64) for name, v in params.items()}
  norms = np.linalg.norm(p["W_dec"], axis=1)
  pre = ((x - p["b_dec"]) @ p["W_enc"].T + p["b_enc"]) * norms
  idx = np.argsort(-pre, axis=1, kind="stable")[:, :k]
  z = np.zeros_like(pre)
  np.put_along_axis(z, idx, np.maximum(np.take_along_axis(pre, idx, 1), 0), 1)
  return z, (z / norms) @ p["W_dec"] + p["b_dec"]


def jumprelu_numpy(params: dict[str, np.ndarray], x: np.ndarray, apply_b_dec_to_input=True):
  """Reference JumpReLU in float64: (dense z [B,n], x_hat [B,d]), z = pre * (pre > threshold).

  apply_b_dec_to_input=False is Gemma Scope's (and SAELens's) form: pre = ReLU(W_enc x + b_enc).
  """
  p = {name: np.asarray(v, np.float64) for name, v in params.items()}
  pre = pre_numpy({**p, "b_dec": p["b_dec"] * apply_b_dec_to_input}, x)
  z = np.where(pre > p["threshold"], pre, 0.0)
  return z, z @ p["W_dec"] + p["b_dec"]


def pre_numpy(params: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
  """Dense ReLU(W_enc (x - b_dec) + b_enc) in float64, [B, n]."""
  p = {name: np.asarray(v, np.float64) for name, v in params.items()}
  return np.maximum((np.asarray(x, np.float64) - p["b_dec"]) @ p["W_enc"].T + p["b_enc"], 0.0)


def decoder_norms_numpy(params: dict[str, np.ndarray], decoder_norm: str) -> np.ndarray:
  """Each decoder row's norm with free decoder norms (a latent's value is its pre-activation times
  it, and its decode weight the value over it), ones with unit rows."""
  W_dec = np.asarray(params["W_dec"], np.float64)
  return np.linalg.norm(W_dec, axis=1) if decoder_norm == "free" else np.ones(len(W_dec))


def batchtopk_mask_numpy(pre: np.ndarray, k: int, cap: int, shards: int = 1):
  """BatchTopK's picks as a dense [B, n] bool mask: each token's top `cap` (of each of `shards`
  equal blocks of latents), then the B*k largest of all those candidates (flattened). Also the cut
  (the (B*k)-th largest candidate) and the fraction of tokens with a block whose cap-th candidate
  is kept (and positive)."""
  rows = np.arange(len(pre))[:, None]
  width = pre.shape[1] // shards
  blocks = [s * width + np.argsort(-pre[:, s * width:(s + 1) * width], axis=1, kind="stable")[
      :, :cap] for s in range(shards)]
  idx = np.concatenate(blocks, axis=1)
  candidates = np.full_like(pre, -np.inf)
  candidates[rows, idx] = pre[rows, idx]
  cut = np.sort(pre[rows, idx].ravel())[-len(pre) * k]
  mask = candidates >= cut
  capped = np.any([(mask & (pre > 0))[rows[:, 0], block[:, -1]] for block in blocks], axis=0)
  return mask, cut, capped.mean()
