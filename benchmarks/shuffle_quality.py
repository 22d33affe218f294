"""How much the trainer's windowed chunk shuffle keeps rows of one image together, against a full
shuffle, on a virtual store (only the order is computed: nothing is read).

  python benchmarks/shuffle_quality.py --images=100000 --rows_per_image=576 --batches=100

The store holds each image's rows contiguously (as the harvest writes them), cut into chunks of
--read_chunk_kb; the order is sae_jax.data.order's, with the window size the trainer derives from
--shuffle_buffer_mb. Prints one JSON line per order: same-image row pairs per batch, distinct
images per batch, and the largest number of rows of one image in a batch (means over batches).
"""

import argparse
import json

import numpy as np

from sae_jax.data import WINDOWS_IN_FLIGHT
from sae_jax.data.order import ChunkOrder


def stats(image_of_batches: list[np.ndarray]) -> dict:
  pairs, distinct, most = [], [], []
  for images in image_of_batches:
    counts = np.unique(images, return_counts=True)[1]
    pairs.append(int((counts * (counts - 1) // 2).sum()))
    distinct.append(len(counts))
    most.append(int(counts.max()))
  return {"same_image_pairs_per_batch": round(float(np.mean(pairs)), 1),
          "distinct_images_per_batch": round(float(np.mean(distinct)), 1),
          "max_rows_of_one_image": round(float(np.mean(most)), 1)}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--images", type=int, default=100_000)
  parser.add_argument("--rows_per_image", type=int, default=576)
  parser.add_argument("--row_bytes", type=int, default=8192, help="d_model x bytes per value")
  parser.add_argument("--batch_size", type=int, default=4096)
  parser.add_argument("--read_chunk_kb", type=int, default=1024)
  parser.add_argument("--shuffle_buffer_mb", type=int, default=1024)
  parser.add_argument("--batches", type=int, default=100)
  args = parser.parse_args()
  rows = args.images * args.rows_per_image
  chunk_rows = max(1, (args.read_chunk_kb << 10) // args.row_bytes)
  first_rows = np.arange(0, rows, chunk_rows)
  counts = np.minimum(first_rows + chunk_rows, rows) - first_rows
  window_chunks = max(1, (args.shuffle_buffer_mb << 20) // WINDOWS_IN_FLIGHT //
                      (chunk_rows * args.row_bytes))
  order = ChunkOrder(counts, window_chunks=window_chunks, seed=0)
  stream, needed, w = [], args.batches * args.batch_size, 0
  while sum(map(len, stream)) < needed:
    chunks = order.windows(0)[w]
    ids = np.concatenate([np.arange(first_rows[c], first_rows[c] + counts[c]) for c in chunks])
    stream.append(ids[order.row_order(0, w)])
    w += 1
  windowed = np.concatenate(stream)[:needed] // args.rows_per_image
  full = np.random.default_rng(0).permutation(rows)[:needed] // args.rows_per_image
  common = {"images": args.images, "rows_per_image": args.rows_per_image,
            "batch_size": args.batch_size, "chunk_rows": chunk_rows,
            "window_rows": window_chunks * chunk_rows}
  for name, images in (("windowed_chunks", windowed), ("full_shuffle", full)):
    print(json.dumps({"order": name, **common,
                      **stats(np.split(images, args.batches))}))


if __name__ == "__main__":
  main()
