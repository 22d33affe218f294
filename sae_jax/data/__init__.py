"""The trainer's input: contiguous chunks of a store, many read at once, served as shuffled batches.

A chunk is a run of contiguous rows of one shard (`--read_chunk_kb` of them, 1 MB by default): one
read request, whatever the storage. `sae_jax.data.order` decides which chunks form each window (the
shuffle buffer) and in which order their rows are served. Batches keep the store's dtype, so 16-bit
rows travel to the device as 16 bits and become float32 there.

Every chunk is checked against the manifest's CRC32C of its rows as it is read (a chunk is a whole
number of the store's checked chunks), so a corrupted store stops the run, naming the file and the
bytes, instead of training on it, and each byte is read once. A store of format version 1 has
whole-file checksums only: each of its shard files is hashed whole before its first row is used.
"""

from __future__ import annotations

import collections
from concurrent import futures
import functools
import sys
import threading
from typing import Iterator, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np

from sae_jax.data.order import ChunkOrder, Position
from sae_jax.store import (FP8, KIND_NAMES, SCALE_BYTES, Store, StoreError, disk_dtype,
                           disk_width, from_disk)

# Windows held at once with read-ahead: the one being served, one ready, one being read.
WINDOWS_IN_FLIGHT = 3


class DataError(ValueError):
  """Flags the input pipeline cannot serve (an unknown token kind)."""


def select_mask(store: Store, token_kinds: Sequence[str] | None) -> np.ndarray | None:
  """Per row, whether its token kind is in `token_kinds`; None means every row."""
  if not token_kinds:
    return None
  names = {v: k for k, v in KIND_NAMES.items()}
  unknown = [t for t in token_kinds if t not in names]
  if unknown:
    raise DataError(f"--token_kinds: unknown kind(s) {unknown}; expected some of {sorted(names)}")
  kinds = [names[t] for t in token_kinds]
  mask = np.concatenate([np.isin(store.shard_meta(s.index)["kind"], kinds) for s in store.shards]
                        or [np.zeros(0, bool)])
  if not mask.any():
    raise StoreError(f"{store.path} has no rows of token kinds {list(token_kinds)}")
  return None if mask.all() else mask


class ChunkReader:
  """Reads chunks of a store's (selected) rows, `read_threads` requests in flight: from a bucket
  as tensorstore futures, from files by as many threads (a file read blocks its thread)."""

  def __init__(self, store: Store, token_kinds: Sequence[str] | None = None, *,
               chunk_bytes: int = 1 << 20, read_threads: int = 16):
    self.store = store
    self.mask = select_mask(store, token_kinds)
    self.dtype = disk_dtype(store.dtype)
    self.width = disk_width(store.dtype, store.d_model)
    self.row_bytes = self.width * self.dtype.itemsize
    self.chunk_rows = max(1, chunk_bytes // self.row_bytes)
    checked = {s.chunks["rows"] for s in store.shards if s.chunks is not None}
    if checked and self.chunk_rows >= max(checked):
      # Whole checked chunks, so each byte is read once. Smaller chunks read the checked chunk
      # that holds them whole (once per read: more bytes read, for small tests).
      self.chunk_rows -= self.chunk_rows % max(checked)
    shard, start, stop = [], [], []
    for s in store.shards:
      starts = np.arange(0, s.rows, self.chunk_rows)
      shard.append(np.full(len(starts), s.index))
      start.append(starts)
      stop.append(np.minimum(starts + self.chunk_rows, s.rows))
    self.shard, self.start, self.stop = (np.concatenate(a) if a else np.zeros(0, np.int64)
                                         for a in (shard, start, stop))
    first_rows = np.array([s.first_row for s in store.shards], np.int64)
    self.first_row = first_rows[self.shard] + self.start
    counts = self.stop - self.start
    if self.mask is not None:
      counts = (np.add.reduceat(self.mask, self.first_row, dtype=np.int64) if len(counts)
                else counts)
      keep = counts > 0  # chunks without a selected row are never read
      self.shard, self.start, self.stop, self.first_row = (
          a[keep] for a in (self.shard, self.start, self.stop, self.first_row))
      counts = counts[keep]
    self.counts = counts.astype(np.int64)
    self.num_rows = int(self.counts.sum())
    self.read_threads = read_threads
    self._pool = futures.ThreadPoolExecutor(read_threads, thread_name_prefix="store-read")
    self._lock = threading.Lock()
    # Shards of a version-1 store are hashed whole before their first use; the others never.
    self._checked = {s.index for s in store.shards if s.chunks is not None}

  def window_chunks(self, buffer_bytes: int, windows_in_flight: int) -> int:
    """Chunks per window so that `windows_in_flight` windows fit in `buffer_bytes`."""
    return max(1, buffer_bytes // windows_in_flight // (self.chunk_rows * self.row_bytes))

  def read(self, chunks: np.ndarray, buffer: np.ndarray | None = None) -> np.ndarray:
    """The selected rows of `chunks`, concatenated in that order, [rows, d] in the store's disk
    dtype (bfloat16 as uint16), read into `buffer` if given (rows of at least the chunks' size)."""
    self._check_shards(np.unique(self.shard[chunks]).tolist())
    sizes = self.stop[chunks] - self.start[chunks]
    ends = np.cumsum(sizes)
    rows = int(ends[-1]) if len(ends) else 0
    out = (np.empty((rows, self.width), self.dtype) if buffer is None else buffer[:rows])
    parts = [(int(c), out[e - n:e]) for c, n, e in zip(chunks, sizes, ends)]
    if self.store.location.asynchronous:  # futures: `read_threads` in flight, no thread each
      in_flight = collections.deque()
      for c, part in parts:
        in_flight.append(self._start_chunk(c, part))
        if len(in_flight) == self.read_threads:
          in_flight.popleft()()
      for finish in in_flight:
        finish()
    else:  # a file read blocks: one thread per read in flight
      for job in [self._pool.submit(lambda c, p: self._start_chunk(c, p)(), c, part)
                  for c, part in parts]:
        job.result()
    if self.mask is not None:
      out = out[np.concatenate([self.mask[self.first_row[c]:self.first_row[c] + n]
                                for c, n in zip(chunks, sizes)])]
    return out

  def _start_chunk(self, chunk: int, out: np.ndarray):
    return self.store.start_rows(int(self.shard[chunk]), int(self.start[chunk]),
                                 int(self.stop[chunk]), out)

  def _check_shards(self, shards: list[int]) -> None:
    """Checks the activations of the shards not checked yet, several files at a time (hashlib
    releases the GIL); raises StoreError naming the first corrupted file."""
    with self._lock:
      todo = [s for s in shards if s not in self._checked]
      check = functools.partial(self.store.check_file, kind="acts")
      for shard, _ in zip(todo, self._pool.map(check, todo)):
        self._checked.add(shard)


def check_lockstep(a: ChunkReader, b: ChunkReader) -> None:
  """Refuses to read two stores in one order unless their (selected) rows are laid out alike, as
  the layer stores of one harvest are: the same chunks then hold the same rows of each."""
  layouts = [(r.store.d_model, r.store.dtype, [s.rows for s in r.store.shards], r.num_rows,
              r.counts.tolist(), None if r.mask is None else r.mask.tolist()) for r in (a, b)]
  names = ["d_model", "dtype", "shard rows", "selected rows", "rows per chunk", "token kinds"]
  for name, x, y in zip(names, *layouts):
    if x != y:
      shown = (x, y) if len(str(x)) + len(str(y)) < 120 else ("...", "...")
      raise StoreError(f"--store={a.store.path} and --store={b.store.path} cannot be read in "
                       f"lockstep: their {name} differ ({shown[0]} vs {shown[1]}); a sweep's "
                       "stores must have the same rows (the layers of one harvest)")


def lane_orders(reader: ChunkReader, *, lanes: int, buffer_bytes: int, seed: int,
                process_index: int, process_count: int) -> list[ChunkOrder]:
  """The orders of this process's lanes: the global batch is `lanes` equal parts, part l from lane
  l's own windows (sae_jax.data.order), and process p serves lanes
  [p * lanes / P, (p + 1) * lanes / P). The batches depend on `lanes`, not on the number of
  processes reading them; the buffer is shared by the process's lanes."""
  if lanes % process_count:
    raise ValueError(f"{lanes} data lanes cannot be split among {process_count} processes")
  mine = lanes // process_count
  window_chunks = min(reader.window_chunks(buffer_bytes // mine, WINDOWS_IN_FLIGHT),
                      max(1, len(reader.counts) // lanes))  # every lane gets a window an epoch
  return [ChunkOrder(reader.counts, window_chunks=window_chunks, seed=seed, lane=lane, lanes=lanes)
          for lane in range(process_index * mine, (process_index + 1) * mine)]


def batches(reader: ChunkReader, orders: Sequence[ChunkOrder], *, batch_rows: int,
            start_step: int = 0, prefetch_batches: int = 0) -> grain.DatasetIterator:
  """This process's batches from step `start_step` on, [batch_rows, d] in the store's dtype: the
  parts of its lanes (`orders`), concatenated. A grain iterator: `get_state()` is where it is.

  With `prefetch_batches` > 0 grain reads each lane's next windows (WINDOWS_IN_FLIGHT - 1 of them,
  one thread a lane) while a thread assembles up to that many batches ahead of the consumer; with
  0 everything happens when a batch is due.
  """
  if batch_rows % len(orders):
    raise ValueError(f"a batch of {batch_rows} rows cannot be split among {len(orders)} lanes")
  part_rows = batch_rows // len(orders)
  lanes = [_LaneParts(_lane_windows(reader, order, bool(prefetch_batches)),
                      order.locate(start_step * part_rows), order, part_rows, reader.store.dtype)
           for order in orders]
  parts = lanes[0] if len(lanes) == 1 else grain.experimental.ZipIterDataset(lanes).map(
      np.concatenate)
  if prefetch_batches:
    parts = grain.experimental.ThreadPrefetchIterDataset(parts,
                                                         prefetch_buffer_size=prefetch_batches)
  return iter(parts)


class _Windows(grain.MapDataset):
  """A lane's windows, epoch after epoch, as grain's random access dataset: element i is window i
  of its stream (window i % n of epoch i // n), its rows (read into buffer i of `buffers`, modulo
  their number) and the order in which they are served."""

  def __init__(self, reader: ChunkReader, order: ChunkOrder, buffers: list):
    super().__init__()
    self._reader, self._order, self._buffers = reader, order, buffers

  def __len__(self) -> int:
    return sys.maxsize  # endless: epoch after epoch

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    epoch, window = divmod(index, self._order.windows_per_epoch)
    rows = self._reader.read(self._order.windows(epoch)[window],
                             self._buffers[index % len(self._buffers)])
    return rows, self._order.row_order(epoch, window)


def _lane_windows(reader: ChunkReader, order: ChunkOrder, read_ahead: bool) -> grain.IterDataset:
  """The windows of a lane, read ahead by grain (a bounded buffer of WINDOWS_IN_FLIGHT - 1
  windows, one thread) if `read_ahead`."""
  # Windows are read into these buffers in turn: written once, they cost no page faults again. The
  # buffer of window j is reused for window j + WINDOWS_IN_FLIGHT: grain starts reading that one
  # when window j + 1 is taken, once j has been served.
  buffers = [np.empty((order.window_chunks * reader.chunk_rows, reader.width), reader.dtype)
             for _ in range(WINDOWS_IN_FLIGHT if read_ahead else 1)]
  ahead = len(buffers) - 1
  return _Windows(reader, order, buffers).to_iter_dataset(grain.ReadOptions(num_threads=min(ahead, 1),
                                                   prefetch_buffer_size=ahead))


class _LaneParts(grain.IterDataset):
  """A lane's parts of the batches from `start` on: `part_rows` rows at a time from its windows,
  each window's rows in their order."""

  def __init__(self, windows: grain.IterDataset, start: Position, order: ChunkOrder,
               part_rows: int, store_dtype: str):
    super().__init__(windows)
    self._state = {"windows": {"next_index": start.epoch * order.windows_per_epoch +
                               start.window}, "offset": start.offset}
    self._part_rows, self._store_dtype = part_rows, store_dtype

  def __iter__(self) -> grain.DatasetIterator:
    parts = _LanePartsIterator(self._parent.__iter__(), self._part_rows, self._store_dtype)
    parts.set_state(self._state)  # before the first read: nothing read ahead yet
    return parts


class _LanePartsIterator(grain.DatasetIterator):

  def __init__(self, windows: grain.DatasetIterator, part_rows: int, store_dtype: str):
    super().__init__(windows)
    self._part_rows, self._store_dtype = part_rows, store_dtype
    self._rows, self._row_order, self._at, self._skip = None, np.zeros(0, np.int64), 0, 0
    self._windows_state = windows.get_state()  # before the window being served was taken

  def __next__(self) -> np.ndarray:
    pending, have = [], 0
    while have < self._part_rows:
      if self._at == len(self._row_order):
        self._windows_state = self._parent.get_state()
        self._rows, self._row_order = next(self._parent)
        self._at, self._skip = self._skip, 0
        continue
      take = self._row_order[self._at:self._at + self._part_rows - have]
      pending.append(self._rows[take])
      have, self._at = have + len(take), self._at + len(take)
    batch = pending[0] if len(pending) == 1 else np.concatenate(pending)
    # Gathered as uint16: 4x faster than as bfloat16. fp8 rows go to the device packed.
    return batch if self._store_dtype == FP8 else from_disk(batch, self._store_dtype)

  def get_state(self) -> dict:
    """The window being served (as the state of grain's window iterator before it was taken) and
    how many of its rows were served: a Position. A window served to its last row is the next
    window at row 0, as `ChunkOrder.locate` puts that position."""
    if self._rows is not None and self._at == len(self._row_order):
      return {"windows": self._parent.get_state(), "offset": 0}
    return {"windows": self._windows_state,
            "offset": self._skip if self._rows is None else self._at}

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state["windows"])
    self._windows_state = state["windows"]
    self._rows, self._row_order, self._at = None, np.zeros(0, np.int64), 0
    self._skip = state["offset"]


def batch_dtype(store_dtype: str) -> np.dtype:
  """The dtype of the batches `batches` serves: the store's (bfloat16 as such), fp8 rows packed as
  uint8 (their width: store.disk_width)."""
  raw = disk_dtype(store_dtype)
  return raw if store_dtype == FP8 else from_disk(np.zeros((0, 1), raw), store_dtype).dtype


def device_rows(x: jax.Array, store_dtype: str) -> jax.Array:
  """A batch as `batches` serves it, as float32 on the device (inside the jitted step): the
  exact values `Store` decodes on the host."""
  if store_dtype != FP8:
    return x.astype(jnp.float32)
  q = jax.lax.bitcast_convert_type(x[:, :-SCALE_BYTES], jnp.float8_e4m3fn).astype(jnp.float32)
  return q * jax.lax.bitcast_convert_type(x[:, -SCALE_BYTES:], jnp.float32)[:, None]


def sample_rows(reader: ChunkReader, num: int, *, seed: int) -> np.ndarray:
  """A deterministic sample of about `num` rows (float32): the rows of random chunks, the same in
  every process; for the b_dec init and the input scale."""
  chunks = np.random.default_rng(seed).permutation(len(reader.counts))
  enough = int(np.searchsorted(np.cumsum(reader.counts[chunks]), num)) + 1
  return np.asarray(from_disk(reader.read(chunks[:enough])[:num], reader.store.dtype), np.float32)
