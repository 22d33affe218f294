"""Rows/s of the trainer's input pipeline over a store, and of random single-row reads (the reader
before chunked reads: grain over shuffled row indices, one memmap gather per batch, float32).

  python benchmarks/reader_bench.py --store=STORE --reader=chunks --batch_size=4096 --steps=40
  python benchmarks/reader_bench.py --store=STORE --reader=rows --batch_size=4096 --steps=40

Prints one JSON line: rows/s after --warmup batches (and per CPU-second of this process, which
other load on the machine disturbs less), read requests per batch and bytes per request
(a row read is one request on object storage), and the batch dtype. --to_device adds the host to
device copy of each batch (jax.device_put; on CPU a copy into XLA's buffer).
"""

import argparse
import json
import platform
import time

import numpy as np

from sae_jax import data
from sae_jax.store import Store


def row_batches(store: Store, batch_size: int, seed: int, threads: int):
  """Random rows, sorted per batch and gathered from the memmaps, as float32 (the old reader)."""
  import grain  # the old pipeline's library, only for this baseline (pip install grain)
  ends = np.cumsum([s.rows for s in store.shards])

  def gather(positions):
    positions = np.sort(positions)
    shard_ids = np.searchsorted(ends, positions, side="right")
    out = np.empty((len(positions), store.d_model), np.float32)
    for shard in np.unique(shard_ids):
      sel = shard_ids == shard
      out[sel] = store.shard_acts(int(shard))[positions[sel] - (ends[shard - 1] if shard else 0)]
    return out

  ds = grain.MapDataset.range(store.rows).shuffle(seed=seed).repeat(None)
  ds = ds.batch(batch_size, drop_remainder=True, batch_fn=np.asarray).map(gather)
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                   prefetch_buffer_size=threads)))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--store", required=True)
  parser.add_argument("--reader", choices=["chunks", "rows"], default="chunks")
  parser.add_argument("--batch_size", type=int, default=4096)
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--warmup", type=int, default=5)
  parser.add_argument("--read_chunk_kb", type=int, default=1024)
  parser.add_argument("--shuffle_buffer_mb", type=int, default=1024)
  parser.add_argument("--read_threads", type=int, default=16)
  parser.add_argument("--prefetch_batches", type=int, default=4)
  parser.add_argument("--to_device", action="store_true")
  args = parser.parse_args()
  store = Store(args.store)
  row_bytes = store.d_model * np.dtype(store.dtype.replace("bfloat16", "float16")).itemsize
  if args.reader == "rows":
    batches = row_batches(store, args.batch_size, 0, args.prefetch_batches)
    requests, request_bytes = args.batch_size, row_bytes
  else:
    reader = data.ChunkReader(store, chunk_bytes=args.read_chunk_kb << 10,
                              read_threads=args.read_threads)
    orders = data.lane_orders(reader, lanes=1, buffer_bytes=args.shuffle_buffer_mb << 20, seed=0,
                              process_index=0, process_count=1)
    batches = data.batches(reader, orders, batch_rows=args.batch_size,
                           prefetch_batches=args.prefetch_batches)
    requests = args.batch_size / reader.chunk_rows
    request_bytes = reader.chunk_rows * row_bytes
  put = lambda b: b
  if args.to_device:
    import jax
    put = lambda b: jax.device_put(b).block_until_ready()
  for _ in range(args.warmup):
    batch = put(next(batches))
  began, cpu = time.perf_counter(), time.process_time()
  for _ in range(args.steps):
    batch = put(next(batches))
  seconds, cpu = time.perf_counter() - began, time.process_time() - cpu
  print(json.dumps({
      "reader": args.reader, "store_dtype": store.dtype, "batch_dtype": str(batch.dtype),
      "d_model": store.d_model, "batch_size": args.batch_size, "to_device": args.to_device,
      "rows_per_s": round(args.steps * args.batch_size / seconds),
      # CPU time of all threads: what the rows cost whatever else shares the machine.
      "rows_per_cpu_s": round(args.steps * args.batch_size / cpu),
      "requests_per_batch": round(requests, 1), "bytes_per_request": request_bytes,
      "cpus": len(__import__("os").sched_getaffinity(0)), "machine": platform.machine()}))


if __name__ == "__main__":
  main()
