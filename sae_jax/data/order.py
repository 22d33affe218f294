"""The training data order: a shuffled chunk order, read in windows whose rows are shuffled.

The store is cut into chunks (runs of contiguous rows within a shard, each one read request). Each
epoch shuffles the chunks and groups them, in that order, into windows of `window_chunks` chunks;
the lanes of a job take the windows round-robin (lane l of L: windows l, l + L, ...), and each
process reads only its own lanes' windows (sae_jax.data.lane_orders). A lane's row stream is its
windows' rows, each window's rows in a random order, epoch after epoch; its part of the batch of
step s is rows [s * b, (s + 1) * b) of that stream.
Everything is a function of (seed, epoch, window), so any step's batch is known without reading
the ones before it: a resume starts exactly where the interrupted run was.

A window is the shuffle buffer: rows of one chunk (often of one image) land in the same window, so
they share batches more often than under a full shuffle (docs/benchmarks.md measures how much).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np


@dataclasses.dataclass(frozen=True)
class Position:
  epoch: int
  window: int  # index among this lane's windows of the epoch
  offset: int  # row within the window


class ChunkOrder:
  """The row stream of one lane over chunks holding `counts[i]` (selected) rows each."""

  def __init__(self, counts: np.ndarray, *, window_chunks: int, seed: int, lane: int = 0,
               lanes: int = 1):
    self.counts = np.asarray(counts, np.int64)
    self.window_chunks = window_chunks
    self.seed = seed
    self.lane = lane
    self.lanes = lanes
    # Per order, not shared by the class: a process's lanes each keep their current epoch.
    self.windows = functools.lru_cache(maxsize=2)(self._windows)
    num_windows = -(-len(self.counts) // window_chunks)
    if num_windows < lanes:
      raise ValueError(f"{len(self.counts)} chunks make {num_windows} windows, fewer than the "
                       f"{lanes} data lanes; use a smaller --read_chunk_kb")

  def _windows(self, epoch: int) -> tuple[np.ndarray, ...]:
    """The chunk ids of each of this lane's windows in `epoch`, in reading order."""
    perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.counts))
    starts = range(self.lane * self.window_chunks, len(perm), self.lanes * self.window_chunks)
    return tuple(perm[i:i + self.window_chunks] for i in starts)

  @property
  def windows_per_epoch(self) -> int:
    """This lane's windows in each epoch (the same number every epoch)."""
    return len(self.windows(0))

  def window_rows(self, epoch: int) -> np.ndarray:
    return np.array([self.counts[w].sum() for w in self.windows(epoch)], np.int64)

  def row_order(self, epoch: int, window: int) -> np.ndarray:
    """The order in which the rows of a window (its chunks' rows, concatenated) are served."""
    global_window = self.lane + window * self.lanes
    size = int(self.counts[self.windows(epoch)[window]].sum())
    return np.random.default_rng([self.seed, epoch, global_window, 1]).permutation(size)

  def locate(self, row: int) -> Position:
    """Where row `row` of this lane's stream is."""
    epoch = 0
    while True:
      sizes = self.window_rows(epoch)
      if row < sizes.sum():
        window = int(np.searchsorted(np.cumsum(sizes), row, side="right"))
        return Position(epoch, window, row - int(sizes[:window].sum()))
      row -= int(sizes.sum())
      epoch += 1
