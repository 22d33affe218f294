"""A store harvested by many workers: each writes its own part, the last one done commits them.

  STORE/parts/00001-of-00003/      worker 1's part: an ordinary store of its slice of the inputs,
                                   with image ids counted from 0 within the part
  STORE/shards/00007.meta.npy      written by the commit: the part's metadata and image records
  STORE/shards/00007.images.jsonl  renumbered to the store's image ids
  STORE/manifest.json              written by the commit, last: lists every shard in input order

Worker i of N harvests the shards [i*S//N, (i+1)*S//N) of the S shards a single worker would write
(shard k holds inputs [k*shard_images, (k+1)*shard_images)), so the committed store holds the
same rows, metadata and image ids, in the same order, as a one-worker harvest. The activations stay
where their worker wrote them (the manifest points into parts/): the commit writes only metadata.
Committing again writes the same bytes, so it is idempotent and any worker may do it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re

import numpy as np

from sae_jax.files import json_bytes, npy_bytes
from sae_jax.store.format import MANIFEST, SHARD_DIR, ShardInfo, StoreError, manifest_json
from sae_jax.store.location import join, open_location

PARTS_DIR = "parts"
WORKER_KEY = "worker"  # the part's slice, in its header's settings; the committed store has none
_PART_NAME = re.compile(r"^(\d{5})-of-(\d{5})$")


def part_name(index: int, count: int) -> str:
  return f"{index:05d}-of-{count:05d}"


def worker_slice(num_inputs: int, shard_inputs: int, index: int, count: int) -> tuple[int, int]:
  """The inputs [lo, hi) that worker `index` of `count` harvests: whole shards, contiguous."""
  if not 0 <= index < count:
    raise StoreError(f"worker index {index} is not in [0, {count})")
  shards = math.ceil(num_inputs / shard_inputs)
  lo, hi = index * shards // count, (index + 1) * shards // count
  return min(lo * shard_inputs, num_inputs), min(hi * shard_inputs, num_inputs)


def part_manifests(path, count: int) -> list[dict | None]:
  """The manifest of each part of a `count`-worker store (None: not started); refuses parts of
  another worker count."""
  location = open_location(path)
  others = sorted({int(m.group(2)) for name in location.subfolders(PARTS_DIR)
                   if (m := _PART_NAME.match(name)) and int(m.group(2)) != count})
  if others:
    raise StoreError(f"{join(path, PARTS_DIR)} holds parts of a harvest by {others[0]} workers, "
                     f"not {count}; rerun with that worker count or use another --out")
  manifests = []
  for index in range(count):
    text = location.read(f"{PARTS_DIR}/{part_name(index, count)}/{MANIFEST}")
    manifests.append(None if text is None else json.loads(text))
  return manifests


def status(path) -> str:
  """Which parts of an uncommitted store are finished, for an error message."""
  names = [n for n in open_location(path).subfolders(PARTS_DIR) if _PART_NAME.match(n)]
  count = int(_PART_NAME.match(names[0]).group(2)) if names else 0
  done = [m is not None and m.get("complete") for m in part_manifests(path, count)] if count else []
  return (f"{sum(done)} of {count} worker parts finished (unfinished: "
          f"{[i for i, d in enumerate(done) if not d]}); rerun the unfinished workers")


def commit(path, count: int) -> bool:
  """Writes the store's manifest if all `count` parts are complete; returns whether it did."""
  manifests = part_manifests(path, count)
  if not all(m is not None and m.get("complete") for m in manifests):
    return False
  keys = ("model", "hookpoint", "layer", "d_model", "dtype")
  headers = [{k: m[k] for k in keys} for m in manifests]
  settings = [{k: v for k, v in m["settings"].items() if k != WORKER_KEY} for m in manifests]
  if any(h != headers[0] for h in headers) or any(s != settings[0] for s in settings):
    raise StoreError(f"the parts in {join(path, PARTS_DIR)} were harvested with different "
                     "settings")
  location = open_location(path)
  shards: list[ShardInfo] = []
  images = rows = 0
  for index, manifest in enumerate(manifests):
    part = f"{PARTS_DIR}/{part_name(index, count)}"
    first_input = manifest["settings"][WORKER_KEY]["first_input"]
    for s in map(ShardInfo.from_json, manifest["shards"]):
      shards.append(_commit_shard(location, part, s, len(shards), rows, first_input, images))
      rows += s.rows
    images += manifest["images"]
  if images == 0:
    raise StoreError(f"none of the inputs of the store {path} could be read; it is left "
                     "uncommitted")
  location.write(MANIFEST, json_bytes(
      manifest_json({**headers[0], "settings": settings[0]}, shards, complete=True)))
  return True


def _commit_shard(location, part: str, s: ShardInfo, index: int, first_row: int,
                  first_input: int, part_images: int) -> ShardInfo:
  """One shard of a part as a shard of the store: its metadata and image records renumbered
  (after the `part_images` images of the parts before it)."""
  meta = np.array(location.mmap_npy(f"{part}/{s.files['meta']}"))
  meta["image_id"] += part_images
  records = [json.loads(line) for line in location.read(f"{part}/{s.files['images']}").decode()
             .splitlines() if line.strip()]
  for r in records:
    r["id"] += part_images
  files = {"acts": f"{part}/{s.files['acts']}", "meta": f"{SHARD_DIR}/{index:05d}.meta.npy",
           "images": f"{SHARD_DIR}/{index:05d}.images.jsonl"}
  contents = {"meta": npy_bytes(meta),
              "images": "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode()}
  for kind, data in contents.items():
    location.write(files[kind], data)
  return ShardInfo(index=index, rows=s.rows, first_row=first_row,
                   first_image=first_input + s.first_image, num_inputs=s.num_inputs, files=files,
                   sha256={"acts": s.sha256["acts"],
                           **{k: hashlib.sha256(d).hexdigest() for k, d in contents.items()}},
                   bad_images=s.bad_images, chunks=s.chunks)
