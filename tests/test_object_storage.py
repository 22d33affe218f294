"""Stores in gs:// and s3:// buckets (emulators on localhost): harvest, verify, copy, train, errors."""

import json
import subprocess
import sys

import numpy as np
import pytest

import synthetic
from harvest.run import HarvestConfig, harvest
from sae_jax import data, dictionary
from sae_jax.store import Store, StoreWriter, open_location

TRAIN = ["--num_latents=64", "--k=4", "--batch_size=64", "--steps=8", "--log_every=4",
         "--lr_warmup_steps=2", "--normalize_inputs", "--data_lanes=2", "--read_chunk_kb=4"]


def run(*command, check=True):
  result = subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True,
                          timeout=300)
  if check:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
  return result


def error_of(result) -> str:
  assert result.returncode == 1, result.stderr[-3000:]
  last = json.loads(result.stdout.splitlines()[-1])
  assert last["ok"] is False and "\n" not in last["error"]
  return last["error"]


def trained(workdir, tmp_path, name) -> dict:
  run("sae_jax.export", f"--workdir={workdir}", f"--out={tmp_path / name}", "--format=sparsify")
  return dictionary.read(next((tmp_path / name).iterdir()))[0]


@pytest.fixture(scope="module")
def local_store(tmp_path_factory):
  return synthetic.write_sparse_store(tmp_path_factory.mktemp("local"), num_shards=4)


def upload(store, url) -> str:
  """The same store written to `url` through StoreWriter."""
  local = Store(store)
  writer = StoreWriter(url, {k: local.manifest[k] for k in
                             ("model", "hookpoint", "layer", "d_model", "dtype", "settings")})
  for s, acts, meta in local.iter_shards():
    images = [json.loads(line) for line in (store / s.files["images"]).read_text().splitlines()]
    writer.write_shard(np.asarray(acts), np.asarray(meta), images, s.num_inputs)
  writer.finish()
  return url


def test_a_bucket_store_verifies_copies_and_reads_like_the_local_one(bucket, local_store,
                                                                      tmp_path):
  url = upload(local_store, bucket.url(f"{tmp_path.name}/store"))
  summary = json.loads(run("sae_jax.store", f"--store={url}").stdout.splitlines()[-1])
  assert summary == {"ok": True, **Store(local_store).summary(), "store": url}
  copied = json.loads(run("sae_jax.store", f"--store={url}",
                          f"--copy_to={tmp_path / 'copy'}").stdout.splitlines()[-1])
  assert copied["rows"] == Store(local_store).rows
  for s in Store(local_store).shards:  # byte for byte: numpy alone reads the copy
    for rel in s.files.values():
      assert (tmp_path / "copy" / rel).read_bytes() == (local_store / rel).read_bytes()
  remote = data.ChunkReader(Store(url), chunk_bytes=1024)
  local = data.ChunkReader(Store(local_store), chunk_bytes=1024)
  chunks = np.random.default_rng(0).permutation(len(local.counts))[:9]
  np.testing.assert_array_equal(remote.read(chunks), local.read(chunks))


def test_harvest_by_two_workers_to_a_bucket_trains_like_its_local_copy(
    bucket, tiny_model, synthetic_images, tmp_path):
  if bucket.scheme == "s3":
    pytest.skip("one bucket kind is enough for the whole pipeline (the store test covers s3)")
  out = bucket.url(f"{tmp_path.name}/harvest")
  for index in (1, 0):
    summary = harvest(HarvestConfig(
        model=str(tiny_model("llava")), layers=(0,), images=str(synthetic_images), out=out,
        tokens="all", batch_size=2, shard_images=4, max_images=24, num_workers=2,
        worker_index=index), progress=False)
  assert summary["committed"]
  url = f"{out}/layer_0"
  run("sae_jax.store", f"--store={url}", f"--copy_to={tmp_path / 'copy'}")
  run("sae_jax.train", f"--store={url}", f"--workdir={tmp_path / 'remote'}", *TRAIN)
  run("sae_jax.train", f"--store={tmp_path / 'copy'}", f"--workdir={tmp_path / 'local'}", *TRAIN)
  remote, local = (trained(tmp_path / n, tmp_path, f"e_{n}") for n in ("remote", "local"))
  for name in dictionary.PARAM_NAMES:
    np.testing.assert_array_equal(remote[name], local[name], err_msg=name)


def test_bucket_errors_are_one_line_naming_the_path(bucket, local_store, tmp_path, monkeypatch):
  missing = bucket.url("").replace("acts", "no-such-bucket") + "store"
  error = error_of(run("sae_jax.store", f"--store={missing}", check=False))
  assert error.startswith(f"{missing}") and "bucket" in error
  url = upload(local_store, bucket.url(f"{tmp_path.name}/store"))
  # A truncated shard object: named, and no checksum passes it.
  location = open_location(url)
  rel = Store(url).shards[1].files["acts"]
  location.write(rel, location.read(rel)[:-100])
  error = error_of(run("sae_jax.store", f"--store={url}", check=False))
  assert error.startswith(f"shard 1 of {url}: {rel} is corrupted")
  error = error_of(run("sae_jax.train", f"--store={url}", f"--workdir={tmp_path / 'run'}",
                       "--b_dec_init=zeros", "--nonormalize_inputs", *TRAIN[:3], check=False))
  assert error.startswith(f"shard 1 of {url}: {rel} is corrupted")
  if bucket.scheme == "s3":  # the GCS emulator takes any request
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
      monkeypatch.delenv(key)
    error = error_of(run("sae_jax.store", f"--store={url}", check=False))
    assert error.startswith(f"{url}/manifest.json: PERMISSION_DENIED")
