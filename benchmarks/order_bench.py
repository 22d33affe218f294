"""Seconds to compute one epoch's chunk order: numpy's permutation (sae_jax.data.order) against grain's
index shuffle (`grain.MapDataset.range(n).shuffle(seed)`, the order grain's samplers use), for a
store of --chunks chunks (a 1 TB store of d=4096 bfloat16 rows in 1 MiB chunks has ~1M).

  python benchmarks/order_bench.py --chunks=1000000

Prints one JSON line. A trainer needs an epoch's order whole at each (re)start, to find the window
that holds its step's rows.
"""

import argparse
import json
import time

import grain
import numpy as np


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--chunks", type=int, default=1_000_000)
  parser.add_argument("--sample", type=int, default=100_000,
                      help="grain's order is timed on this many indices and scaled")
  args = parser.parse_args()
  began = time.perf_counter()
  np.random.default_rng([0, 0]).permutation(args.chunks)
  numpy_s = time.perf_counter() - began
  shuffled = grain.MapDataset.range(args.chunks).shuffle(seed=0)
  began = time.perf_counter()
  for i in range(args.sample):
    shuffled[i]
  grain_s = (time.perf_counter() - began) * args.chunks / args.sample
  print(json.dumps({"chunks": args.chunks, "numpy_permutation_s": round(numpy_s, 4),
                    "grain_index_shuffle_s": round(grain_s, 2),
                    "grain_over_numpy": round(grain_s / numpy_s)}))


if __name__ == "__main__":
  main()
