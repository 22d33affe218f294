"""The activation store: round trip per dtype, resume, refusal of other settings, corruption."""

import json
import re
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from sae_jax import data
from sae_jax.data.order import ChunkOrder
from sae_jax.store import (KIND_IMAGE_BASE, KIND_TEXT, META_DTYPE, Store, StoreError, StoreWriter)


def header(dtype="float32", d_model=6, **settings):
  return {"model": "tiny", "hookpoint": "model.layers.1", "layer": 1, "d_model": d_model,
          "dtype": dtype, "settings": {"tokens": "all", **settings}}


def shard(rng, rows, d_model=6, image_id=0):
  acts = rng.normal(size=(rows, d_model)).astype(np.float32)
  meta = np.zeros(rows, META_DTYPE)
  meta["image_id"] = image_id
  meta["position"] = np.arange(rows)
  meta["kind"] = np.where(np.arange(rows) % 3 == 0, KIND_TEXT, KIND_IMAGE_BASE)
  meta["patch"] = np.where(meta["kind"] == KIND_TEXT, -1, np.arange(rows))
  return acts, meta


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_round_trip_reads_back_with_numpy_alone(tmp_path, dtype):
  rng = np.random.default_rng(0)
  writer = StoreWriter(tmp_path, header(dtype))
  written = [shard(rng, rows, image_id=i) for i, rows in enumerate([5, 7])]
  for i, (acts, meta) in enumerate(written):
    writer.write_shard(acts, meta, [{"id": i, "source": f"img{i}.png", "prompt": "<image>",
                                     "grid": [2, 2]}], num_inputs=1)
  writer.finish()

  store = Store(tmp_path, verify=True)
  assert store.rows == 12 and store.d_model == 6 and len(store.images()) == 2
  expected = np.concatenate([a for a, _ in written])
  cast = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[dtype]
  rows = np.stack([store[i] for i in range(store.rows)])
  np.testing.assert_array_equal(rows, expected.astype(cast).astype(np.float32))
  np.testing.assert_array_equal(store.meta(), np.concatenate([m for _, m in written]))
  # The documented numpy-only reading path (docs/formats.md).
  manifest = json.loads((tmp_path / "manifest.json").read_text())
  raw = np.load(tmp_path / manifest["shards"][1]["files"]["acts"], allow_pickle=False)
  if manifest["dtype"] == "bfloat16":
    raw = raw.view(ml_dtypes.bfloat16)
  np.testing.assert_array_equal(raw.astype(np.float32), rows[5:])


def test_fp8_rows_keep_each_value_within_its_rounding_and_read_with_numpy_alone(tmp_path):
  rng = np.random.default_rng(0)
  acts = rng.normal(size=(9, 6)).astype(np.float32) * np.logspace(-3, 3, 9)[:, None]
  acts[4] = 0  # a zero row keeps scale 1
  meta = shard(rng, 9)[1]
  writer = StoreWriter(tmp_path, header("float8_e4m3fn"))
  writer.write_shard(acts, meta, [{"id": 0}], num_inputs=1)
  writer.finish()
  rows = Store(tmp_path, verify=True).shard_acts(0)
  scale = np.abs(acts).max(1, keepdims=True) / 448
  # e4m3: 3 mantissa bits (half a step: 1/16 of the value), subnormals below 2^-6 in steps of 2^-9.
  assert (np.abs(rows - acts) <= np.abs(acts) / 16 + scale * 2.0 ** -10).all()
  assert (rows[4] == 0).all() and (np.abs(rows).max(1)[[0, 8]] > 0).all()
  # The documented numpy-only reading path (docs/formats.md).
  raw = np.load(tmp_path / "shards" / "00000.acts.npy", allow_pickle=False)
  decoded = (raw[:, :6].view(ml_dtypes.float8_e4m3fn).astype(np.float32) *
             raw[:, 6:].copy().view("<f4"))
  np.testing.assert_array_equal(decoded, rows)


def test_reopening_resumes_and_other_settings_are_refused(tmp_path):
  rng = np.random.default_rng(1)
  writer = StoreWriter(tmp_path, header())
  writer.write_shard(*shard(rng, 4), images=[{"id": 0}], num_inputs=2,
                     bad_images=[{"input": 1, "source": "missing.png", "error": "not found"}])
  again = StoreWriter(tmp_path, header())
  assert (again.inputs_done, again.images_done, again.rows) == (2, 1, 4)
  with pytest.raises(StoreError, match="other settings"):
    StoreWriter(tmp_path, header(tokens="text"))
  with pytest.raises(StoreError, match="incomplete"):
    Store(tmp_path)
  assert Store(tmp_path, allow_incomplete=True).manifest["bad_images"][0]["source"] == "missing.png"


def test_corrupted_shard_is_named_by_the_cli(tmp_path):
  rng = np.random.default_rng(2)
  writer = StoreWriter(tmp_path, header())
  for i in range(3):
    writer.write_shard(*shard(rng, 4), images=[{"id": i}], num_inputs=1)
  writer.finish()
  ok = subprocess.run([sys.executable, "-m", "sae_jax.store", f"--store={tmp_path}"],
                      capture_output=True, text=True)
  assert ok.returncode == 0 and json.loads(ok.stdout.splitlines()[-1])["rows"] == 12

  target = tmp_path / "shards" / "00001.acts.npy"
  raw = bytearray(target.read_bytes())
  raw[-1] ^= 0xFF
  target.write_bytes(bytes(raw))
  bad = subprocess.run([sys.executable, "-m", "sae_jax.store", f"--store={tmp_path}"],
                       capture_output=True, text=True)
  assert bad.returncode == 1
  error = json.loads(bad.stdout.splitlines()[-1])["error"]
  assert "shard 1" in error and "00001.acts.npy" in error


def test_batches_cover_every_selected_row_once_per_epoch_and_resume_exactly(tmp_path):
  rng = np.random.default_rng(3)
  writer = StoreWriter(tmp_path, header())
  for i in range(3):
    acts, meta = shard(rng, 40)
    acts[:, 0] = np.arange(40) + 40 * i  # row id in column 0
    writer.write_shard(acts, meta, [{"id": i}], num_inputs=1)
  writer.finish()
  store = Store(tmp_path)
  text_rows = np.flatnonzero(store.meta()["kind"] == KIND_TEXT)
  reader = data.ChunkReader(store, ["text"], chunk_bytes=5 * 6 * 4)  # 5 rows: 24 chunks
  assert reader.num_rows == len(text_rows) == 42

  def stream(start_step=0, lane=0, lanes=1, prefetch_batches=0):
    order = ChunkOrder(reader.counts, window_chunks=3, seed=7, lane=lane, lanes=lanes)
    return data.batches(reader, [order], batch_rows=2, start_step=start_step,
                        prefetch_batches=prefetch_batches)

  one = stream()
  first_epoch = np.concatenate([next(one)[:, 0] for _ in range(21)]).astype(int)
  np.testing.assert_array_equal(np.sort(first_epoch), text_rows)  # each once, shuffled
  assert not np.array_equal(first_epoch, text_rows)
  later = [next(one) for _ in range(30)]  # into the next epochs, in another order
  resumed = stream(start_step=25, prefetch_batches=2)
  for expected in later[4:]:
    np.testing.assert_array_equal(next(resumed), expected)
  # Two lanes read disjoint windows; together, in an epoch, every row once.
  halves = [stream(lane=p, lanes=2) for p in range(2)]
  counts = [sum(reader.counts[w].sum() for w in ChunkOrder(
      reader.counts, window_chunks=3, seed=7, lane=p, lanes=2).windows(0))
      for p in range(2)]
  seen = np.concatenate([np.concatenate([next(h)[:, 0] for _ in range(c // 2)])
                         for h, c in zip(halves, counts)]).astype(int)
  np.testing.assert_array_equal(np.sort(seen), text_rows)
  with pytest.raises(ValueError, match="--token_kinds"):
    data.ChunkReader(store, ["pixels"])


def test_a_corrupted_chunk_is_named_by_its_bytes_and_version_1_stores_still_read(tmp_path,
                                                                                monkeypatch):
  from sae_jax.store import format as store_format
  monkeypatch.setattr(store_format, "CHECK_CHUNK_BYTES", 10 * 6 * 4)  # 10 float32 rows a chunk
  rng = np.random.default_rng(4)
  writer = StoreWriter(tmp_path / "v2", header())
  written = [shard(rng, 35, image_id=i) for i in range(2)]
  for i, (acts, meta) in enumerate(written):
    writer.write_shard(acts, meta, [{"id": i}], num_inputs=1)
  writer.finish()
  info = Store(tmp_path / "v2").shards[0]
  assert info.chunks["rows"] == 10 and len(info.chunks["crc32c"]) == 4  # 10, 10, 10, 5 rows
  rel, offset = info.files["acts"], info.chunks["offset"]
  path = tmp_path / "v2" / rel
  raw = bytearray(path.read_bytes())
  raw[offset + 25 * 24 + 3] ^= 0xFF  # a byte of row 25: the third chunk, rows [20, 30)
  path.write_bytes(bytes(raw))
  bad_bytes = f"is corrupted at bytes [{offset + 20 * 24}, {offset + 30 * 24})"

  result = subprocess.run([sys.executable, "-m", "sae_jax.store", f"--store={tmp_path / 'v2'}"],
                          capture_output=True, text=True)
  assert result.returncode == 1
  assert json.loads(result.stdout.splitlines()[-1])["error"].startswith(
      f"shard 0 of {tmp_path / 'v2'}: {rel} {bad_bytes}")
  store = Store(tmp_path / "v2")
  # Readers check the chunks they read: rows outside the bad chunk read, the bad one is refused.
  np.testing.assert_array_equal(store.read_rows(0, 30, 35), written[0][0][30:])
  np.testing.assert_array_equal(store[19], written[0][0][19])
  reader = data.ChunkReader(store, chunk_bytes=10 * 6 * 4)
  np.testing.assert_array_equal(reader.read(np.array([4, 1])),
                                np.concatenate([written[1][0][:10], written[0][0][10:20]]))
  with pytest.raises(StoreError, match=re.escape(bad_bytes)):
    reader.read(np.array([2]))
  with pytest.raises(StoreError, match=re.escape(bad_bytes)):
    store[25]

  # The same store as version 1 wrote it (no per-chunk checksums): read as before, each file
  # hashed whole before its first row is used.
  manifest = json.loads((tmp_path / "v2" / "manifest.json").read_text())
  manifest["version"] = 1
  for s in manifest["shards"]:
    del s["chunks"]
  (tmp_path / "v2" / "manifest.json").write_text(json.dumps(manifest))
  old = Store(tmp_path / "v2")
  np.testing.assert_array_equal(old.read_rows(1, 0, 35), written[1][0])
  reader = data.ChunkReader(old, chunk_bytes=10 * 6 * 4)
  np.testing.assert_array_equal(reader.read(np.array([4])), written[1][0][:10])
  with pytest.raises(StoreError, match=f"{rel} is corrupted \\(sha256"):
    reader.read(np.array([0]))  # rows 0-9 are intact, but their file is not
  with pytest.raises(StoreError, match=f"{rel} is corrupted \\(sha256"):
    old.verify()
