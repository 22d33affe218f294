"""Hookpoints: find a LLaVA model's decoder layers and copy selected rows of their outputs.

The decoder layers moved between transformers versions (`language_model.model.layers` before 4.52,
`model.language_model.layers` after), so they are found by searching the module tree rather than
by a fixed path. The recorded vector of layer L is the output of decoder block L, which is
`hidden_states[L + 1]` of `output_hidden_states=True` (except for the last block: transformers
replaces the last hidden state by its final-norm output, while the block output - what the paper
hooks and what we store - comes before that norm). Forward hooks give it without keeping every
layer's hidden states alive.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn


class HookError(ValueError):
  """A requested hookpoint that the model does not have."""


class StopForward(Exception):
  """Raised by the last hook to end a forward pass whose remaining layers nobody needs."""


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
  """(path, module list) of the language model's decoder layers (never the vision tower's)."""
  found = [(name, module) for name, module in model.named_modules()
           if isinstance(module, nn.ModuleList) and name.split(".")[-1] == "layers"
           and "language_model" in name.split(".")]
  if len(found) != 1:
    raise HookError(f"expected one decoder layer list under a 'language_model' module of "
                    f"{type(model).__name__}, found {[name for name, _ in found]}")
  return found[0]


def resolve_layers(model: nn.Module, layers: Sequence[int]) -> dict[int, str]:
  """Hookpoint name of each requested layer index, e.g. {24: 'model.language_model.layers.24'}."""
  path, blocks = find_decoder_layers(model)
  for layer in layers:
    if not 0 <= layer < len(blocks):
      raise HookError(f"--layers: layer {layer} does not exist; {path} has {len(blocks)} decoder "
                      f"layers (0..{len(blocks) - 1})")
  return {layer: f"{path}.{layer}" for layer in layers}


class LayerCapture:
  """Forward hooks that copy the selected token rows of each requested layer's output to the CPU.

  Use as a context manager; per forward pass, `capture(forward, batch_index, position)` returns
  {layer: [rows, d_model] tensor}. Only the selected rows leave the device, so memory stays at one
  batch of rows. With `stop_after_last` the hook of the deepest layer ends the forward pass.
  """

  def __init__(self, model: nn.Module, layers: Sequence[int], stop_after_last: bool):
    _, blocks = find_decoder_layers(model)
    self._blocks = {layer: blocks[layer] for layer in layers}
    self._last = max(layers)
    self._stop_after_last = stop_after_last
    self._handles: list = []
    self._index: tuple[torch.Tensor, torch.Tensor] | None = None
    self._captured: dict[int, torch.Tensor] = {}

  def __enter__(self) -> "LayerCapture":
    for layer, block in self._blocks.items():
      self._handles.append(block.register_forward_hook(self._hook(layer)))
    return self

  def __exit__(self, *exc) -> None:
    for handle in self._handles:
      handle.remove()
    self._handles.clear()

  def _hook(self, layer: int):
    def hook(module, args, output):
      del module, args
      hidden = output[0] if isinstance(output, tuple) else output  # tuple before transformers 5
      self._captured[layer] = hidden[self._index].to("cpu")
      if self._stop_after_last and layer == self._last:
        raise StopForward()
    return hook

  def capture(self, forward: Callable[[], object], batch_index: torch.Tensor,
              position: torch.Tensor) -> dict[int, torch.Tensor]:
    self._index, self._captured = (batch_index, position), {}
    try:
      forward()
    except StopForward:
      pass
    missing = set(self._blocks) - set(self._captured)
    if missing:
      raise HookError(f"the forward pass never ran decoder layers {sorted(missing)}")
    return self._captured
