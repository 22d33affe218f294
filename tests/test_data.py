"""The trainer's input pipeline: bounded read-ahead, 16-bit rows served as stored, and shards
checked against the manifest before their rows are used."""

import shutil
import time

import jax
import ml_dtypes
import numpy as np
import pytest

import synthetic

from sae_jax import data
from sae_jax.data.order import ChunkOrder
from sae_jax.store import META_DTYPE, Store, StoreError, StoreWriter


@pytest.fixture(scope="module")
def store(tmp_path_factory):
  return synthetic.write_sparse_store(tmp_path_factory.mktemp("store"), num_shards=4)


def flip_last_byte(path):
  raw = bytearray(path.read_bytes())
  raw[-1] ^= 1  # the last byte is data, past the .npy header: the file still loads
  path.write_bytes(bytes(raw))


def settled_count(produced: list, at_least: int, deadline_s: float = 10.0) -> int:
  """len(produced) once the reader stops: after it reached `at_least` (or the deadline), half a
  second more for any read-ahead beyond it to show."""
  end = time.monotonic() + deadline_s
  while len(produced) < at_least and time.monotonic() < end:
    time.sleep(0.01)
  time.sleep(0.5)
  return len(produced)


def test_the_reader_stays_a_bounded_distance_ahead_of_a_slow_consumer(store, monkeypatch):
  rows = data.ChunkReader(Store(store), chunk_bytes=16 * 16 * 4)  # 16 rows a chunk: 64 chunks
  read = []
  original = rows.read
  monkeypatch.setattr(rows, "read",
                      lambda chunks, buffer: read.append(1) or original(chunks, buffer))
  order = ChunkOrder(rows.counts, window_chunks=2, seed=0)  # a window is one batch of 32 rows
  batches = data.batches(rows, [order], batch_rows=32, prefetch_batches=3)
  for consumed in range(1, 4):
    next(batches)  # then the consumer dawdles: the reader stops
    # ahead: 3 batches queued, 1 assembled and waiting to be queued, 1 window queued and 1 read
    # and waiting to be queued.
    assert settled_count(read, consumed + 6) == consumed + 6


@pytest.mark.parametrize("lanes, prefetch_batches", [(1, 0), (2, 3)])
def test_the_position_after_each_step_is_the_one_a_resume_builds(store, lanes, prefetch_batches):
  """grain's iterator state after N batches (what a checkpoint saves) equals the state of the
  pipeline built at step N from the order (what a resume builds and compares), at every step:
  steps that end a window inside an epoch, at an epoch's end, and in the middle of a window."""
  rows = data.ChunkReader(Store(store), chunk_bytes=16 * 16 * 4)  # 16 rows a chunk: 64 chunks
  orders = [ChunkOrder(rows.counts, window_chunks=3, seed=0, lane=lane, lanes=lanes)
            for lane in range(lanes)]  # windows of 48 rows (the last of an epoch shorter)
  part_rows = 24
  stream = data.batches(rows, orders, batch_rows=part_rows * lanes,
                        prefetch_batches=prefetch_batches)
  ends = {True: 0, False: 0}  # steps that end a window (row 0 of the next one), and the others
  for step in range(1, 4 * rows.num_rows // (part_rows * lanes)):  # four epochs
    next(stream)
    built = data.batches(rows, orders, batch_rows=part_rows * lanes, start_step=step)
    assert stream.get_state() == built.get_state(), step
    position = orders[0].locate(step * part_rows)
    ends[position.offset == 0] += 1
  assert ends[True] >= 8 and ends[False] >= 8, ends


def test_16_bit_rows_are_served_as_stored(tmp_path):
  rng = np.random.default_rng(0)
  acts = rng.normal(size=(64, 8)).astype(np.float32)
  writer = StoreWriter(tmp_path, {"model": "m", "hookpoint": "h", "layer": 0, "d_model": 8,
                                  "dtype": "bfloat16", "settings": {}})
  writer.write_shard(acts, np.zeros(64, META_DTYPE), [{"id": 0}], num_inputs=1)
  writer.finish()
  rows = data.ChunkReader(Store(tmp_path), chunk_bytes=64)
  batch = next(data.batches(rows, [ChunkOrder(rows.counts, window_chunks=16, seed=0)],
                            batch_rows=64))
  assert batch.dtype == ml_dtypes.bfloat16
  stored = Store(tmp_path).shard_acts(0)
  np.testing.assert_array_equal(np.sort(batch.view(np.uint16), 0),
                                np.sort(stored.view(np.uint16), 0))


def test_fp8_rows_go_to_the_device_packed_and_decode_as_the_store_does(tmp_path):
  rng = np.random.default_rng(0)
  writer = StoreWriter(tmp_path, {"model": "m", "hookpoint": "h", "layer": 0, "d_model": 8,
                                  "dtype": "float8_e4m3fn", "settings": {}})
  writer.write_shard(rng.normal(size=(64, 8)) * 30, np.zeros(64, META_DTYPE), [{"id": 0}],
                     num_inputs=1)
  writer.finish()
  rows = data.ChunkReader(Store(tmp_path), chunk_bytes=48)
  batch = next(data.batches(rows, [ChunkOrder(rows.counts, window_chunks=16, seed=0)],
                            batch_rows=64))
  assert batch.dtype == np.uint8 and batch.shape == (64, 8 + 4)
  on_device = np.asarray(jax.jit(data.device_rows, static_argnums=1)(batch, "float8_e4m3fn"))
  expected = Store(tmp_path).shard_acts(0)
  np.testing.assert_array_equal(np.sort(on_device, 0), np.sort(expected, 0))


def test_a_corrupted_shard_is_refused_before_its_rows_are_read(store, tmp_path):
  bad = shutil.copytree(store, tmp_path / "bad")
  flip_last_byte(bad / "shards" / "00002.acts.npy")
  rows = data.ChunkReader(Store(bad))  # one chunk per shard
  good = Store(store)
  np.testing.assert_array_equal(rows.read(np.array([0, 1])), np.concatenate(
      [good.shard_acts(0), good.shard_acts(1)]))  # shards 0 and 1 are intact
  with pytest.raises(StoreError, match=r"shard 2 of .*shards/00002\.acts\.npy is corrupted"):
    rows.read(np.array([0, 2]))


def test_a_truncated_shard_is_refused_naming_it(store, tmp_path):
  bad = shutil.copytree(store, tmp_path / "bad")
  path = bad / "shards" / "00001.acts.npy"
  path.write_bytes(path.read_bytes()[:-64])
  rows = data.ChunkReader(Store(bad))
  rows._checked.add(1)  # past the checksum: the read itself must notice
  with pytest.raises(StoreError, match=r"shard 1: .*00001\.acts\.npy ends at byte \d+: it is truncated"):
    rows.read(np.array([1]))


def test_a_corrupted_metadata_file_is_refused_when_selecting_token_kinds(store, tmp_path):
  bad = shutil.copytree(store, tmp_path / "bad")
  flip_last_byte(bad / "shards" / "00001.meta.npy")
  with pytest.raises(StoreError, match=r"shards/00001\.meta\.npy is corrupted"):
    data.ChunkReader(Store(bad), ["image_base"])
