"""The SAE of an export as a small torch module (any dtype, any device): TopK or JumpReLU.

    pre = ReLU(W_enc (x - b_dec) + b_enc),   x_hat = W_dec^T z + b_dec,
    z = TopK_k(pre)                  (TopK)
    z = pre * (pre > threshold)      (JumpReLU: a BatchTopK SAE at inference, or e.g. Gemma Scope)

Loading goes through `sae_jax.formats.dictionary.read`, the one reader of both export layouts
(sparsify and SAELens) and of dictionaries those libraries trained, so the key mapping and the
folding or refusal of their options live in one place. It returns float32 arrays; casting them to
bfloat16 or float16 afterwards is exact for exports written in those dtypes.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from sae_jax.formats import dictionary


class SAE(nn.Module):
  """W_enc [n, d], b_enc [n], W_dec [n, d], b_dec [d] (latent-major, as in the export), and either
  `k` (TopK) or params["threshold"] [n] (JumpReLU, k=None)."""

  def __init__(self, params: dict[str, np.ndarray | torch.Tensor], k: int | None, *,
               dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    super().__init__()
    jumprelu = dictionary.THRESHOLD in params
    if jumprelu != (k is None):
      raise ValueError(f"k={k!r}: a TopK SAE needs k, a JumpReLU one (with a threshold) takes none")
    if k is not None and k <= 0:
      raise ValueError(f"k must be positive, got {k}")
    names = dictionary.PARAM_NAMES + ((dictionary.THRESHOLD,) if jumprelu else ())
    for name in names:
      value = torch.as_tensor(params[name]).to(device=device, dtype=dtype)
      self.register_parameter(name, nn.Parameter(value, requires_grad=False))
    self.k = k
    self.num_latents, self.d_in = self.W_enc.shape
    self.info: dict = {}  # from_export: layout, hookpoint, folder and the export's sidecar

  @classmethod
  def from_export(cls, path, *, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu") -> "SAE":
    """Loads EXPORT/<hookpoint> (or EXPORT with a single hookpoint folder), either layout."""
    params, info = dictionary.read(path)
    sae = cls(params, info["k"], dtype=dtype, device=device)
    sae.info = info
    return sae

  @property
  def jumprelu(self) -> bool:
    return self.k is None

  def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
    """ReLU(W_enc (x - b_dec) + b_enc) for x [..., d] -> [..., n], in the module's dtype."""
    x = x.to(self.W_enc.dtype)
    return torch.relu(nn.functional.linear(x - self.b_dec, self.W_enc, self.b_enc))

  def activate(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The sparse code of pre-activations [..., n]: (values, indices) [..., w], largest first.

    TopK: w = k. JumpReLU: w = the largest number of latents above threshold in any row (at least
    1), so every such latent of every row is held; a row with fewer pads with zero values, which
    decode to nothing.
    """
    if not self.jumprelu:
      return torch.topk(pre, self.k, dim=-1, sorted=True)
    kept = torch.where(pre > self.threshold, pre, torch.zeros_like(pre))
    width = max(int((kept > 0).sum(-1).max()) if kept.numel() else 0, 1)
    return torch.topk(kept, width, dim=-1, sorted=True)

  def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [..., w], indices [..., w]) of the active latents, largest first (see activate)."""
    return self.activate(self.pre_activations(x))

  def decode(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """W_dec^T z + b_dec from the sparse code, without ever building the dense [..., n] z."""
    lead = values.shape[:-1]
    # embedding_bag sums the w gathered decoder rows weighted by their values: O(w d) per row.
    out = nn.functional.embedding_bag(
        indices.reshape(-1, indices.shape[-1]), self.W_dec,
        per_sample_weights=values.reshape(-1, values.shape[-1]).to(self.W_dec.dtype), mode="sum")
    return (out + self.b_dec).reshape(*lead, self.d_in)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    """The reconstruction x_hat of x [..., d]."""
    return self.decode(*self.encode(x))
