"""The trainer's input pipeline: bounded read-ahead, workers that get no copy of the store, and
shards checked against the manifest before their rows are used."""

import pickle
import shutil
import time

import numpy as np
import pytest

import synthetic

from sae_jax import data
from sae_jax.store import Store, StoreError


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


def test_the_reader_stays_prefetch_batches_ahead_of_a_slow_consumer(store):
  produced = []

  def count(batch):
    produced.append(len(batch))
    return batch

  dataset = data.make_dataset(data.RowGather(Store(store)), batch_size=64, seed=0,
                              num_epochs=None).map(count)
  batches = data.make_batches(dataset, prefetch=3, workers=0)
  for consumed in range(1, 4):
    next(batches)  # then the consumer dawdles: the reader must stop 3 batches ahead
    assert settled_count(produced, consumed + 3) == consumed + 3


def test_a_gather_pickles_without_the_rows_it_has_read(store):
  gather = data.RowGather(Store(store))
  positions = np.arange(0, gather.num_rows, 3)
  rows = gather(positions)  # opens every shard's memory map
  pickled = pickle.dumps(gather)
  assert len(pickled) < Store(store).shard_acts(0).nbytes / 4
  np.testing.assert_array_equal(pickle.loads(pickled)(positions), rows)


def test_a_corrupted_shard_is_refused_before_its_rows_are_read(store, tmp_path):
  bad = shutil.copytree(store, tmp_path / "bad")
  flip_last_byte(bad / "shards" / "00002.acts.npy")
  gather = data.RowGather(Store(bad))
  good = Store(store)
  np.testing.assert_array_equal(gather(np.arange(512)), np.concatenate(
      [good.shard_acts(0), good.shard_acts(1)]))  # shards 0 and 1 are intact
  with pytest.raises(StoreError, match=r"shard 2 of .*shards/00002\.acts\.npy is corrupted"):
    gather(np.array([0, 600]))


def test_a_corrupted_metadata_file_is_refused_when_selecting_token_kinds(store, tmp_path):
  bad = shutil.copytree(store, tmp_path / "bad")
  flip_last_byte(bad / "shards" / "00001.meta.npy")
  with pytest.raises(StoreError, match=r"shards/00001\.meta\.npy is corrupted"):
    data.RowGather(Store(bad), ["image_base"])
