"""The SAE architectures, looked up by name (as SAELens's register_sae_class).

Each module owns what its architecture decides (base.Architecture: the step's selection, its own
state, the inference encoder, the export and the metrics); nothing outside this package compares
architecture names. Matryoshka (matryoshka.py) wraps either selection. A new architecture is a
module with an Architecture subclass, registered here.
"""

from __future__ import annotations

import numpy as np

from sae_jax.formats import dictionary
from sae_jax.architectures.base import Architecture
from sae_jax.architectures.batchtopk import BatchTopK
from sae_jax.architectures.topk import TopK

_REGISTRY: dict[str, Architecture] = {}


def register(architecture: Architecture) -> Architecture:
  _REGISTRY[architecture.name] = architecture
  return architecture


def names() -> tuple[str, ...]:
  return tuple(_REGISTRY)


def get(name: str) -> Architecture:
  if name not in _REGISTRY:
    raise ValueError(f"architecture={name!r}; expected one of {', '.join(_REGISTRY)}")
  return _REGISTRY[name]


register(TopK())
register(BatchTopK())


def of_run(run: dict) -> Architecture:
  """The architecture a run.json records (runs from before BatchTopK record none: TopK)."""
  return get(run["sae"].get("architecture", "topk"))


def model_variables(run: dict) -> tuple[str, ...]:
  """The model variables `from_training` needs for the run recorded in `run`."""
  return dictionary.PARAM_NAMES + of_run(run).exported_variables


def from_training(variables: dict[str, np.ndarray], run: dict, step: int) -> dict[str, np.ndarray]:
  """The exported parameters (acting on raw activations) of a trained model's variables: the
  four parameters, free decoder norms folded in, and what the architecture adds (BatchTopK: its
  learned threshold on every latent, Bussmann et al.'s inference rule)."""
  params = {name: np.asarray(variables[name], np.float32) for name in dictionary.PARAM_NAMES}
  if run["sae"].get("decoder_norm", "unit") == "free":
    params = dictionary.fold_decoder_norms(params)
  params.update(of_run(run).exported(variables, run["sae"], step))
  return dictionary.fold_input_scale(params, run["input_scale"])
