"""What an SAE architecture decides, and TopK's answers as the defaults.

Every architecture shares the sparse encoder (each token's top `selection_width` pre-activations),
the decoder and the losses; it owns how the training step picks from those candidates, any state
of its own, how a user encodes at inference, and what its export holds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import jax
import numpy as np

if TYPE_CHECKING:
  from sae_jax.config import SAEConfig
  from sae_jax.model import SparseAutoencoder


class Architecture:
  name: str
  # Whether inference encodes differently from training (then the trainer also logs
  # inference_fvu and inference_l0 at log steps, from `reconstruct`).
  inference_differs: bool = False
  # The model variables, beyond the four parameters, that an export reads.
  exported_variables: tuple[str, ...] = ()
  # Whether the training selection needs each token's candidates in one global order. If not, on
  # latent shards each shard's own candidates stay where they are (`sharded.sparse_encoder`),
  # [B, shards * per-shard count], and `select` sees them so.
  merges_shard_candidates: bool = True

  def validate(self, cfg: SAEConfig) -> None:
    """Raises ValueError('knob=value ...') for a config this architecture cannot train."""

  def selection_width(self, cfg: SAEConfig) -> int:
    """Candidates per token the sparse encoder selects for the training step."""
    return 4 * cfg.k if cfg.multi_topk else cfg.k

  def select(self, cfg: SAEConfig, values: jax.Array, indices: jax.Array
             ) -> tuple[jax.Array, jax.Array, dict]:
    """(values, indices, metrics) the step reconstructs with, from the encoder's candidates."""
    return values[:, :cfg.k], indices[:, :cfg.k], {}

  def variables(self, cfg: SAEConfig) -> dict:
    """The architecture's own state: nnx Variables, set on the model by these names."""
    return {}

  def update_state(self, model: SparseAutoencoder, top_values: jax.Array,
                   step: jax.Array) -> dict:
    """Updates the architecture's state after a step's selection; returns metrics."""
    return {}

  def reconstruct(self, model: SparseAutoencoder, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(x_hat, the code's active values) as a user encodes x."""
    values, indices = model.encode(x)
    return model.decode(values, indices), values

  def loggable(self, scalars: dict) -> dict:
    """A step's metrics as they are logged."""
    return scalars

  def exported(self, variables: dict[str, np.ndarray], cfg: dict, step: int) -> dict:
    """Export parameters beyond the four, from `exported_variables` (cfg: run.json's "sae")."""
    return {}

  def start_from(self, params: dict, source: str, note: Callable[[str], None]) -> dict:
    """An exported dictionary's parameters as this architecture starts training from them."""
    if "threshold" in params:
      note(f"{source} is a JumpReLU; --architecture={self.name} trains without its threshold")
      params = {name: v for name, v in params.items() if name != "threshold"}
    return params
