"""grain input pipeline over an activation store: shuffled row batches, sharded per process.

The pipeline works on row *indices* (grain's index shuffle needs O(1) memory, whatever the store
size) and gathers a whole batch of rows at once with numpy fancy indexing per shard, so the cost
per step is one vectorised read rather than one Python call per row.

Resume is stateless: the batch for step s is `dataset[s]`, so slicing at the restored step
reproduces the uninterrupted stream exactly, whatever the worker count.

Every shard file is checked against the manifest's sha256 before its first row is used (once per
reading process), so a corrupted store stops the run instead of training on its rows.
"""

from __future__ import annotations

from concurrent import futures
import functools
import os
import threading
from typing import Iterable, Iterator, Sequence

import grain
import numpy as np

from sae_jax.store import KIND_NAMES, Store, StoreError, sha256_file


def check_file(store: Store, shard: int, kind: str) -> None:
  """Raises StoreError naming the file if one shard file differs from the manifest's sha256."""
  info = store.shards[shard]
  rel = info.files[kind]
  if not (store.path / rel).exists():
    raise StoreError(f"shard {shard} of {store.path}: file {rel} is missing")
  if sha256_file(store.path / rel) != info.sha256[kind]:
    raise StoreError(f"shard {shard} of {store.path}: {rel} is corrupted (sha256 does not match "
                     "the manifest); harvest this store again")


class DataError(ValueError):
  """Flags the input pipeline cannot serve (an unknown token kind, an indivisible batch)."""


def select_rows(store: Store, token_kinds: Sequence[str] | None) -> np.ndarray | None:
  """Global row indices whose token kind is in `token_kinds`; None means every row."""
  if not token_kinds:
    return None
  names = {v: k for k, v in KIND_NAMES.items()}
  unknown = [t for t in token_kinds if t not in names]
  if unknown:
    raise DataError(f"--token_kinds: unknown kind(s) {unknown}; expected some of {sorted(names)}")
  wanted = np.array([names[t] for t in token_kinds])
  for shard in range(len(store.shards)):  # the selection reads every shard's metadata
    check_file(store, shard, "meta")
  rows = np.flatnonzero(np.isin(store.meta()["kind"], wanted))
  if rows.size == 0:
    raise StoreError(f"{store.path} has no rows of token kinds {list(token_kinds)}")
  return None if rows.size == store.rows else rows


class RowGather:
  """The rows of a store selected by token kind; maps a batch of positions among them to a
  float32 [batch, d] array. Build it once: selecting reads every shard's metadata.

  Pickles (for grain's worker processes) as the store's path and the shards already checked, never
  the memory maps it has opened: those would pickle as copies of whole shards."""

  def __init__(self, store: Store, token_kinds: Sequence[str] | None = None):
    self.store = store
    self.rows = select_rows(store, token_kinds)
    self._ends = np.cumsum([s.rows for s in store.shards])
    self._checked: set[int] = set()
    self._lock = threading.Lock()  # grain's reader threads share one gather

  def __getstate__(self) -> dict:
    state = dict(self.__dict__, store=self.store.path)
    del state["_lock"]
    return state

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state, store=Store(state["store"]), _lock=threading.Lock())

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
    shards = np.unique(shard_ids)
    self.check_shards(shards.tolist())
    for shard in shards:
      sel = shard_ids == shard
      start = self._ends[shard - 1] if shard else 0
      out[sel] = self.store.shard_acts(int(shard))[global_rows[sel] - start]
    return out

  def check_shards(self, shards: Iterable[int]) -> None:
    """Checks the activations of the shards not checked yet, several files at a time (hashlib
    releases the GIL); raises StoreError naming the first corrupted file."""
    with self._lock:
      todo = [s for s in shards if s not in self._checked]
      if not todo:
        return
      check = functools.partial(check_file, self.store, kind="acts")
      with futures.ThreadPoolExecutor(min(len(todo), os.cpu_count() or 1)) as pool:
        for shard, _ in zip(todo, pool.map(check, todo)):
          self._checked.add(shard)


def make_dataset(gather: RowGather, *, batch_size: int, seed: int, num_epochs: int | None,
                 start_step: int = 0, process_index: int = 0,
                 process_count: int = 1) -> grain.MapDataset:
  """Per-process batches of `batch_size // process_count` rows; item i is the batch of step i.

  Rows are shuffled with a fresh permutation each epoch (`shuffle` before `repeat`), each process
  takes every `process_count`-th row of the global order, and a trailing partial batch is dropped.
  """
  if batch_size % process_count:
    raise DataError(f"--batch_size={batch_size} must be divisible by the number of processes "
                    f"({process_count})")
  if gather.num_rows < batch_size:
    raise StoreError(f"{gather.store.path} has {gather.num_rows} selected rows, fewer than one "
                     f"batch (--batch_size={batch_size})")
  ds = grain.MapDataset.range(gather.num_rows).shuffle(seed=seed).repeat(num_epochs)
  ds = ds[process_index::process_count]
  ds = ds.batch(batch_size // process_count, drop_remainder=True, batch_fn=np.asarray)
  return ds[start_step:].map(gather)


def make_batches(dataset: grain.MapDataset, *, prefetch: int, workers: int) -> Iterator:
  """Iterates `dataset` reading at most `prefetch` batches ahead of the consumer per reading
  process (grain's default, 500 elements, is 500 whole batches here), in `workers` processes if
  > 0 (each holding up to `prefetch` + 1 batches), else in `prefetch` threads of this one."""
  batches = dataset.to_iter_dataset(grain.ReadOptions(num_threads=prefetch,
                                                      prefetch_buffer_size=prefetch))
  if workers:
    batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                               per_worker_buffer_size=1))
  return iter(batches)


def sample_rows(gather: RowGather, num: int, *, seed: int) -> np.ndarray:
  """A deterministic random sample of rows (float32 [num, d]): for b_dec init and input scaling."""
  num = min(num, gather.num_rows)
  rng = np.random.default_rng(seed)
  return gather(rng.choice(gather.num_rows, size=num, replace=False))
