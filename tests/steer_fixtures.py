"""Fixtures shared by the steering, hallucination and SAE-quality tests: random exported SAEs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sae_jax.formats import dictionary

HOOKPOINT = "model.language_model.layers.0"  # the tiny models have decoder layers 0 and 1


def random_params(d: int, n: int = 32, seed: int = 0, always_on: int | None = None,
                  bias: float = 0.5) -> dict[str, np.ndarray]:
  """A tied SAE (W_enc = W_dec, unit rows, b_dec = 0) whose latents fire: b_enc > 0.

  With tied rows, w_f . d_f = 1, so adding (c - a_f) d_f moves latent f's pre-activation by exactly
  c - a_f. `always_on` gets a bias far above the others, so it is in the top k at every position.
  """
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(n, d)).astype(np.float32)
  w /= np.linalg.norm(w, axis=1, keepdims=True)
  b_enc = np.full(n, bias, np.float32) + rng.uniform(0, 0.1, n).astype(np.float32)
  if always_on is not None:
    b_enc[always_on] = 20.0
  return {"W_enc": w.copy(), "b_enc": b_enc, "W_dec": w, "b_dec": np.zeros(d, np.float32)}


def write_export(out: Path, params: dict[str, np.ndarray], k: int = 4) -> Path:
  return dictionary.write(out, HOOKPOINT, params, k=k, layout="sparsify")
