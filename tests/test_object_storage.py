"""Stores in gs:// and s3:// buckets (emulators on localhost): harvest, verify, copy, train, errors."""

import json
import subprocess
import sys
import time

import numpy as np
import pytest

import emulators
import synthetic
from harvest.run import HarvestConfig, harvest
from sae_jax import architectures, data
from sae_jax.formats import dictionary
from sae_jax.training import checkpoint
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


def trained(workdir) -> dict:
  """The parameters sae_jax.export writes for `workdir` (input scale folded in), in-process."""
  model, run_record, step = checkpoint.load_model(workdir)
  return architectures.from_training({name: np.asarray(getattr(model, name)[...])
                                      for name in architectures.model_variables(run_record)},
                                     run_record, step)


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
  # Up again with the CLI: one PUT per file, the same bytes; a rerun sends only what is missing.
  up = bucket.url(f"{tmp_path.name}/uploaded")
  sent = json.loads(run("sae_jax.store", f"--store={local_store}",
                        f"--copy_to={up}").stdout.splitlines()[-1])
  files = [rel for s in Store(local_store).shards for rel in s.files.values()]
  assert sent["bytes_copied"] == sum((local_store / rel).stat().st_size for rel in files)
  target = open_location(up)
  for rel in files + ["manifest.json"]:
    assert target.read(rel) == (local_store / rel).read_bytes(), rel
  target.write(files[4], b"left by a killed upload")
  again = json.loads(run("sae_jax.store", f"--store={local_store}",
                         f"--copy_to={up}").stdout.splitlines()[-1])
  assert again["bytes_copied"] == (local_store / files[4]).stat().st_size
  assert target.read(files[4]) == (local_store / files[4]).read_bytes()
  remote = data.ChunkReader(Store(url), chunk_bytes=1024)
  local = data.ChunkReader(Store(local_store), chunk_bytes=1024)
  chunks = np.random.default_rng(0).permutation(len(local.counts))[:9]
  np.testing.assert_array_equal(remote.read(chunks), local.read(chunks))


def harvest_flags(model, images, out, index) -> list[str]:
  return [f"--model={model}", "--layers=0", f"--images={images}", f"--out={out}", "--tokens=all",
          "--batch_size=2", "--shard_images=4", "--max_images=24", "--num_workers=2",
          f"--worker_index={index}"]


def two_processes(store, workdir) -> None:
  port = emulators.free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "sae_jax.train", f"--store={store}", f"--workdir={workdir}", *TRAIN,
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=300) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]


# One bucket kind is enough for the whole pipeline (the store tests cover s3 too).
@pytest.mark.parametrize("bucket", ["gs"], indirect=True)
def test_harvest_by_two_workers_to_a_bucket_trains_like_its_local_copy(
    bucket, tiny_model, synthetic_images, tmp_path):
  out = bucket.url(f"{tmp_path.name}/harvest")
  model = tiny_model("llava")
  # Worker 1 killed (-9) while it uploads: readers never see a partial shard, and the rerun
  # finishes its part.
  part = f"{out}/layer_0/parts/00001-of-00002"
  process = subprocess.Popen([sys.executable, "-m", "harvest",
                              *harvest_flags(model, synthetic_images, out, 1)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 120
  while time.monotonic() < deadline and process.poll() is None:
    text = open_location(part).read("manifest.json")
    if text and json.loads(text)["shards"]:
      break
    time.sleep(0.01)
  process.kill()
  process.wait()
  killed = Store(part, allow_incomplete=True)
  assert 1 <= len(killed.shards) < 3 and not killed.manifest["complete"]
  killed.verify()  # every shard it lists is whole
  for index in (1, 0):
    run("harvest", *harvest_flags(model, synthetic_images, out, index))
  url = f"{out}/layer_0"
  reference = tmp_path / "one_worker"
  harvest(HarvestConfig(model=str(model), layers=(0,), images=str(synthetic_images),
                        out=str(reference), tokens="all", batch_size=2, shard_images=4,
                        max_images=24), progress=False)
  assert ([s.sha256 for s in Store(url, verify=True).shards] ==
          [s.sha256 for s in Store(reference / "layer_0").shards])

  run("sae_jax.store", f"--store={url}", f"--copy_to={tmp_path / 'copy'}")
  run("sae_jax.train", f"--store={url}", f"--workdir={tmp_path / 'remote'}", *TRAIN)
  run("sae_jax.train", f"--store={tmp_path / 'copy'}", f"--workdir={tmp_path / 'local'}", *TRAIN)
  two_processes(url, tmp_path / "remote2")
  two_processes(tmp_path / "copy", tmp_path / "local2")
  for a, b in (("remote", "local"), ("remote2", "local2")):
    first, second = (trained(tmp_path / n) for n in (a, b))
    for name in dictionary.PARAM_NAMES:
      np.testing.assert_array_equal(first[name], second[name], err_msg=f"{a} {name}")


def test_bucket_errors_are_one_line_naming_the_path(bucket, local_store, tmp_path, monkeypatch):
  missing = bucket.url("").replace("acts", "absent") + "store"
  error = error_of(run("sae_jax.store", f"--store={missing}", check=False))
  # The reason, after the path: the bucket named as what may be wrong.
  assert error.startswith(f"{missing}: cannot list it (") and error.endswith(
      "does the bucket exist, and may these credentials read it?"), error
  url = upload(local_store, bucket.url(f"{tmp_path.name}/store"))
  # A truncated shard object: named, and no checksum passes it.
  location = open_location(url)
  rel = Store(url).shards[1].files["acts"]
  location.write(rel, location.read(rel)[:-100])
  error = error_of(run("sae_jax.store", f"--store={url}", check=False))
  assert error.startswith(f"shard 1 of {url}: {rel} is corrupted")
  error = error_of(run("sae_jax.store", f"--store={url}", f"--copy_to={tmp_path / 'copy'}",
                       check=False))
  assert error.startswith(f"shard 1 of {url}: {rel} is corrupted")
  # Nothing half-written: no manifest (so no store), no partial file.
  assert sorted(p.name for p in (tmp_path / "copy").rglob("*")) == [
      "00000.acts.npy", "00000.images.jsonl", "00000.meta.npy", "shards"]
  error = error_of(run("sae_jax.train", f"--store={url}", f"--workdir={tmp_path / 'run'}",
                       "--b_dec_init=zeros", "--nonormalize_inputs", *TRAIN[:3], check=False))
  # Training reads ranges: the short object is found by the read of its last chunk.
  assert error.startswith(f"shard 1: {url}/{rel} ends before byte ") and error.endswith(
      "it is truncated"), error
  if bucket.scheme == "s3":  # the GCS emulator takes any request
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
      monkeypatch.delenv(key)
    error = error_of(run("sae_jax.store", f"--store={url}", check=False))
    assert error.startswith(f"{url}/manifest.json: PERMISSION_DENIED")
