"""Collects the rows of each batch and commits them as one shard per layer store.

A shard covers a fixed run of input images (`--shard_images`), so shard k always holds the same
batches: a resumed harvest starts at a shard boundary and writes bit-identical shards.
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
import torch

from sae_jax.store import META_DTYPE, StoreWriter


class ActivationError(ValueError):
  """Activations that cannot be stored (NaN or Inf)."""


def to_numpy(rows: torch.Tensor) -> np.ndarray:
  """A CPU tensor as a numpy array without copying (bfloat16 through ml_dtypes).

  The writer thread works in numpy only: torch ops there would compete with the forward pass for
  torch's intra-op thread pool, which costs far more than the work itself on a few cores.
  """
  if rows.dtype == torch.bfloat16:
    return rows.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return rows.numpy()


@dataclasses.dataclass
class BatchRows:
  rows: dict[int, torch.Tensor]  # layer -> [n, d_model], on the CPU
  meta: np.ndarray  # [n] of META_DTYPE
  images: list[dict]  # image table records of the batch


@dataclasses.dataclass
class ShardEnd:
  index: int
  num_inputs: int
  bad_images: list[dict]


class ShardAssembler:
  """Handles BatchRows and ShardEnd items in order (in the writer thread)."""

  def __init__(self, writers: dict[int, StoreWriter]):
    self._writers = writers
    self._reset()

  def _reset(self):
    self._rows: dict[int, list[np.ndarray]] = {layer: [] for layer in self._writers}
    self._meta: list[np.ndarray] = []
    self._images: list[dict] = []

  def __call__(self, item) -> None:
    if isinstance(item, BatchRows):
      self._add(item)
    else:
      self._commit(item)

  def _add(self, batch: BatchRows) -> None:
    for layer, tensor in batch.rows.items():
      rows = to_numpy(tensor)
      finite = np.isfinite(rows).all(axis=1)
      if not finite.all():
        image_id = int(batch.meta["image_id"][np.argmin(finite)])
        record = next(r for r in batch.images if r["id"] == image_id)
        raise ActivationError(f"NaN/Inf activations at layer {layer} for image id {image_id} "
                              f"({record['source']}); nothing of its shard was written")
      self._rows[layer].append(rows)
    self._meta.append(batch.meta)
    self._images.extend(batch.images)

  def _commit(self, end: ShardEnd) -> None:
    meta = np.concatenate(self._meta) if self._meta else np.zeros((0,), META_DTYPE)
    for layer, writer in self._writers.items():
      if len(writer.shards) > end.index:
        continue  # an earlier, killed run committed this shard of this layer already
      d_model = writer.header["d_model"]
      acts = (np.concatenate(self._rows[layer]) if self._rows[layer]
              else np.zeros((0, d_model), np.float32))
      writer.write_shard(acts, meta, self._images, end.num_inputs, end.bad_images)
    self._reset()
