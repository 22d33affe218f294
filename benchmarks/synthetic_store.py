"""Writes an activation store of random rows shaped like a real harvest, for benchmarks.

  python benchmarks/synthetic_store.py --out=/tmp/store --d_model=512 --images=200 --grid=24

Each image gets grid*grid base-patch rows (kind image_base), as `harvest --tokens=base_patches`
writes them; values are Gaussian plus a shared offset, in --dtype (float16 by default).
"""

import argparse

import numpy as np

from sae_jax.store import KIND_IMAGE_BASE, META_DTYPE, StoreWriter


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", required=True)
  parser.add_argument("--d_model", type=int, default=512)
  parser.add_argument("--images", type=int, default=200)
  parser.add_argument("--grid", type=int, default=24)
  parser.add_argument("--images_per_shard", type=int, default=50)
  parser.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  patches = args.grid * args.grid
  writer = StoreWriter(args.out, {"model": "synthetic", "hookpoint": "synthetic", "layer": 0,
                                  "d_model": args.d_model, "dtype": args.dtype,
                                  "settings": {"images": args.images, "grid": args.grid}})
  for first in range(writer.images_done, args.images, args.images_per_shard):
    ids = np.arange(first, min(first + args.images_per_shard, args.images))
    acts = rng.normal(size=(len(ids) * patches, args.d_model)).astype(np.float32) + 1.0
    meta = np.zeros(len(acts), META_DTYPE)
    meta["image_id"] = np.repeat(ids, patches)
    meta["kind"] = KIND_IMAGE_BASE
    meta["patch"] = np.tile(np.arange(patches), len(ids))
    images = [{"id": int(i), "source": f"synthetic/{i}.png", "prompt": "<image>",
               "grid": [args.grid, args.grid]} for i in ids]
    writer.write_shard(acts, meta, images, num_inputs=len(ids))
  writer.finish()


if __name__ == "__main__":
  main()
