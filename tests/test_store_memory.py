"""Memory of the commands that read a STORE from a bucket: set by their flags, not by the store.

Each command runs on a small and on a much larger store in the GCS emulator, and its peak RSS
(the child's, from getrusage(RUSAGE_CHILDREN) in a wrapper process that runs only it) must not
grow with the store. The larger store's manifest lists 8x the shards, each with its own metadata
and image records; to keep the test short its activations are the same few objects listed again
(the format allows a shard's files anywhere under the store, as a multi-worker harvest does), so
every reader sees 8x the rows and bytes.
"""

import dataclasses
import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

import emulators
from sae_jax.formats import dictionary
from sae_jax.store import KIND_IMAGE_BASE, KIND_TEXT, META_DTYPE, Store, StoreWriter, open_location
from sae_jax.files import npy_bytes

D, GRID, IMAGES_PER_SHARD = 1024, 8, 63  # float16: 65 rows an image, ~8 MiB a shard
REAL_SHARDS, SMALL, LARGE = 2, 2, 16
MIB = 1 << 20


def shard_meta(first_image: int) -> tuple[np.ndarray, list[dict]]:
  per = GRID * GRID + 1  # one text row, then the base grid
  meta = np.zeros(IMAGES_PER_SHARD * per, META_DTYPE)
  meta["image_id"] = np.repeat(first_image + np.arange(IMAGES_PER_SHARD), per)
  meta["kind"] = np.tile([KIND_TEXT] + [KIND_IMAGE_BASE] * GRID ** 2, IMAGES_PER_SHARD)
  meta["patch"] = np.tile([-1, *range(GRID ** 2)], IMAGES_PER_SHARD)
  records = [{"id": first_image + i, "source": f"{first_image + i}.png", "grid": [GRID, GRID]}
             for i in range(IMAGES_PER_SHARD)]
  return meta, records


def write_store(url: str, shards: int) -> str:
  """A float16 store of `shards` shards whose activations cycle through REAL_SHARDS objects."""
  writer = StoreWriter(url, {"model": "synthetic", "hookpoint": "model.layers.0", "layer": 0,
                             "d_model": D, "dtype": "float16", "settings": {}})
  rng = np.random.default_rng(0)
  for i in range(REAL_SHARDS):
    meta, records = shard_meta(i * IMAGES_PER_SHARD)
    writer.write_shard(rng.normal(size=(len(meta), D)).astype(np.float32), meta, records,
                       num_inputs=IMAGES_PER_SHARD)
  location = open_location(url)
  for i in range(REAL_SHARDS, shards):
    real = writer.shards[i % REAL_SHARDS]
    meta, records = shard_meta(i * IMAGES_PER_SHARD)
    files = {"acts": real.files["acts"], "meta": f"shards/{i:05d}.meta.npy",
             "images": f"shards/{i:05d}.images.jsonl"}
    contents = {"meta": npy_bytes(meta),
                "images": "".join(json.dumps(r) + "\n" for r in records).encode()}
    for kind, data in contents.items():
      location.write(files[kind], data)
    writer.shards.append(dataclasses.replace(
        real, index=i, first_row=writer.rows, first_image=i * IMAGES_PER_SHARD, files=files,
        sha256={"acts": real.sha256["acts"],
                **{k: hashlib.sha256(v).hexdigest() for k, v in contents.items()}}))
  writer.finish()
  return url


def peak_rss_mib(*command) -> float:
  """Runs `python -m command` in a wrapper and returns the command's peak RSS in MiB."""
  wrapper = ("import resource, subprocess, sys\n"
             "r = subprocess.run([sys.executable, '-m', *sys.argv[1:]], capture_output=True, "
             "text=True)\n"
             "assert r.returncode == 0, r.stderr[-3000:]\n"
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
  result = subprocess.run([sys.executable, "-c", wrapper, *command], capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return int(result.stdout.split()[-1]) / 1024


@pytest.mark.parametrize("bucket", ["gs"], indirect=True)
def test_peak_memory_of_each_command_does_not_grow_with_the_store(bucket, tmp_path):
  small = write_store(bucket.url(f"{tmp_path.name}/small"), SMALL)
  large = write_store(bucket.url(f"{tmp_path.name}/large"), LARGE)
  sizes = [Store(u).rows * D * 2 / MIB for u in (small, large)]
  assert sizes[1] >= 7 * sizes[0] and sizes[1] > 100
  rng = np.random.default_rng(1)
  params = {"W_enc": rng.normal(size=(64, D)), "b_enc": np.zeros(64),
            "W_dec": rng.normal(size=(64, D)) / np.sqrt(D), "b_dec": np.zeros(D)}
  export = dictionary.write(tmp_path / "export", "model.layers.0", params, k=4,
                            layout="sparsify")
  commands = {
      "verify": lambda url, name: ("sae_jax.store", f"--store={url}"),
      "scan": lambda url, name: ("sae_jax.scan", f"--sae={export}", f"--store={url}",
                                 f"--out={tmp_path / name / 'scan'}", "--top_n=2"),
      "train": lambda url, name: ("sae_jax.train", f"--store={url}",
                                  f"--workdir={tmp_path / name / 'train'}", "--num_latents=64",
                                  "--k=4", "--batch_size=64", "--steps=2", "--log_every=2",
                                  "--shuffle_buffer_mb=8", "--b_dec_init=zeros",
                                  "--nonormalize_inputs", "--lr_warmup_steps=0"),
  }
  grown = {}
  for command, flags in commands.items():
    peaks = [peak_rss_mib(*flags(url, name)) for url, name in ((small, "small"), (large, "large"))]
    grown[command] = (round(peaks[0]), round(peaks[1]))
  print("peak RSS MiB (small store, large store):", grown)
  # The old readers grew by the store (+112 MiB here): allow a quarter of that for noise.
  limit = (sizes[1] - sizes[0]) / 4
  assert all(b - a < limit for a, b in grown.values()), (grown, limit)
