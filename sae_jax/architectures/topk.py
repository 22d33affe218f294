"""TopK (Gao et al. 2024): each token keeps its k largest pre-activations, in training and at
inference. With --multi_topk the encoder selects 4k, and the step also reconstructs with them."""

from __future__ import annotations

from sae_jax.architectures.base import Architecture


class TopK(Architecture):
  name = "topk"
