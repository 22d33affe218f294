"""The TopK SAE of an export as a small torch module (any dtype, any device).

    pre = ReLU(W_enc (x - b_dec) + b_enc),   z = TopK_k(pre),   x_hat = W_dec^T z + b_dec

Loading goes through `sae_jax.dictionary.read`, the one reader of both export layouts (sparsify and
SAELens) and of dictionaries those libraries trained, so the key mapping and the folding or refusal
of their options live in one place. It returns float32 arrays; casting them to bfloat16
or float16 afterwards is exact for exports written in those dtypes.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from sae_jax import dictionary


class TopKSAE(nn.Module):
  """W_enc [n, d], b_enc [n], W_dec [n, d], b_dec [d] (latent-major, as in the export)."""

  def __init__(self, params: dict[str, np.ndarray | torch.Tensor], k: int, *,
               dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    super().__init__()
    if k <= 0:
      raise ValueError(f"k must be positive, got {k}")
    for name in dictionary.PARAM_NAMES:
      value = torch.as_tensor(params[name]).to(device=device, dtype=dtype)
      self.register_parameter(name, nn.Parameter(value, requires_grad=False))
    self.k = k
    self.num_latents, self.d_in = self.W_enc.shape
    self.info: dict = {}  # from_export: layout, hookpoint, folder and the export's sidecar

  @classmethod
  def from_export(cls, path, *, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu") -> "TopKSAE":
    """Loads EXPORT/<hookpoint> (or EXPORT with a single hookpoint folder), either layout."""
    params, info = dictionary.read(path)
    sae = cls(params, info["k"], dtype=dtype, device=device)
    sae.info = info
    return sae

  def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
    """ReLU(W_enc (x - b_dec) + b_enc) for x [..., d] -> [..., n], in the module's dtype."""
    x = x.to(self.W_enc.dtype)
    return torch.relu(nn.functional.linear(x - self.b_dec, self.W_enc, self.b_enc))

  def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [..., k], indices [..., k]) of the k largest pre-activations, largest first."""
    values, indices = torch.topk(self.pre_activations(x), self.k, dim=-1, sorted=True)
    return values, indices

  def decode(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """W_dec^T z + b_dec from the sparse code, without ever building the dense [..., n] z."""
    lead = values.shape[:-1]
    # embedding_bag sums the k gathered decoder rows weighted by their values: O(k d) per row.
    out = nn.functional.embedding_bag(
        indices.reshape(-1, indices.shape[-1]), self.W_dec,
        per_sample_weights=values.reshape(-1, values.shape[-1]).to(self.W_dec.dtype), mode="sum")
    return (out + self.b_dec).reshape(*lead, self.d_in)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    """The reconstruction x_hat of x [..., d]."""
    return self.decode(*self.encode(x))
