"""grain input pipeline over an activation store: shuffled row batches, sharded per process.

The pipeline works on row *indices* (grain's index shuffle needs O(1) memory, whatever the store
size) and gathers a whole batch of rows at once with numpy fancy indexing per shard, so the cost
per step is one vectorised read rather than one Python call per row.

Resume is stateless: the batch for step s is `dataset[s]`, so slicing at the restored step
reproduces the uninterrupted stream exactly, whatever the worker count.
"""

from __future__ import annotations

from typing import Sequence

import grain
import numpy as np

from sae_jax.store import KIND_NAMES, Store, StoreError


def select_rows(store: Store, token_kinds: Sequence[str] | None) -> np.ndarray | None:
  """Global row indices whose token kind is in `token_kinds`; None means every row."""
  if not token_kinds:
    return None
  names = {v: k for k, v in KIND_NAMES.items()}
  unknown = [t for t in token_kinds if t not in names]
  if unknown:
    raise ValueError(f"--token_kinds: unknown kind(s) {unknown}; expected some of {sorted(names)}")
  wanted = np.array([names[t] for t in token_kinds])
  rows = np.flatnonzero(np.isin(store.meta()["kind"], wanted))
  if rows.size == 0:
    raise StoreError(f"{store.path} has no rows of token kinds {list(token_kinds)}")
  return None if rows.size == store.rows else rows


class RowGather:
  """The rows of a store selected by token kind; maps a batch of positions among them to a
  float32 [batch, d] array. Build it once: selecting reads every shard's metadata."""

  def __init__(self, store: Store, token_kinds: Sequence[str] | None = None):
    self.store = store
    self.rows = select_rows(store, token_kinds)
    self._ends = np.cumsum([s.rows for s in store.shards])

  def __repr__(self) -> str:
    # grain checkpoints are keyed on reprs: keep this free of object ids and paths.
    return f"RowGather({self.store!r}, selected={self.num_rows})"

  @property
  def num_rows(self) -> int:
    return self.store.rows if self.rows is None else int(self.rows.size)

  def __call__(self, positions: np.ndarray) -> np.ndarray:
    positions = np.sort(np.asarray(positions, dtype=np.int64))  # sorted reads are sequential-ish
    global_rows = positions if self.rows is None else self.rows[positions]
    shard_ids = np.searchsorted(self._ends, global_rows, side="right")
    out = np.empty((len(global_rows), self.store.d_model), np.float32)
    for shard in np.unique(shard_ids):
      sel = shard_ids == shard
      start = self._ends[shard - 1] if shard else 0
      out[sel] = self.store.shard_acts(int(shard))[global_rows[sel] - start]
    return out


def make_dataset(gather: RowGather, *, batch_size: int, seed: int, num_epochs: int | None,
                 start_step: int = 0, process_index: int = 0,
                 process_count: int = 1) -> grain.MapDataset:
  """Per-process batches of `batch_size // process_count` rows; item i is the batch of step i.

  Rows are shuffled with a fresh permutation each epoch (`shuffle` before `repeat`), each process
  takes every `process_count`-th row of the global order, and a trailing partial batch is dropped.
  """
  if batch_size % process_count:
    raise ValueError(f"--batch_size={batch_size} must be divisible by the number of processes "
                     f"({process_count})")
  if gather.num_rows < batch_size:
    raise StoreError(f"{gather.store.path} has {gather.num_rows} selected rows, fewer than one "
                     f"batch (--batch_size={batch_size})")
  ds = grain.MapDataset.range(gather.num_rows).shuffle(seed=seed).repeat(num_epochs)
  ds = ds[process_index::process_count]
  ds = ds.batch(batch_size // process_count, drop_remainder=True, batch_fn=np.asarray)
  return ds[start_step:].map(gather)


def sample_rows(gather: RowGather, num: int, *, seed: int) -> np.ndarray:
  """A deterministic random sample of rows (float32 [num, d]): for b_dec init and input scaling."""
  num = min(num, gather.num_rows)
  rng = np.random.default_rng(seed)
  return gather(rng.choice(gather.num_rows, size=num, replace=False))
