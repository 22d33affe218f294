"""Peak RSS and rows/s of the commands that read a STORE: verify, scan and train, each in its own
process (peak RSS from getrusage(RUSAGE_CHILDREN) of a wrapper that runs only it).

  python benchmarks/store_memory_bench.py --store=STORE --workdir=/tmp/membench [--scan_latents=256]

Prints one JSON line per command: {"command", "store", "rows", "store_mib", "peak_rss_mib",
"seconds", "rows_per_s"} (rows_per_s: the store's rows over the command's wall time; for train,
the rows its steps consumed). scan uses a random TopK dictionary of --scan_latents latents.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from sae_jax.formats import dictionary
from sae_jax.store import Store

WRAPPER = ("import resource, subprocess, sys\n"
           "r = subprocess.run([sys.executable, '-m', *sys.argv[1:]], capture_output=True, "
           "text=True)\n"
           "sys.stderr.write(r.stderr[-3000:] if r.returncode else '')\n"
           "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def peak_rss(command: list[str]) -> tuple[float, float]:
  """(peak RSS in MiB, wall seconds) of `python -m command`."""
  began = time.perf_counter()
  result = subprocess.run([sys.executable, "-c", WRAPPER, *command], capture_output=True,
                          text=True)
  seconds = time.perf_counter() - began
  code, rss = result.stdout.split()
  if code != "0":
    raise SystemExit(f"{command[0]} failed: {result.stderr}")
  return int(rss) / 1024, seconds


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--store", required=True)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--scan_latents", type=int, default=256)
  parser.add_argument("--train_steps", type=int, default=30)
  parser.add_argument("--batch_size", type=int, default=4096)
  parser.add_argument("--shuffle_buffer_mb", type=int, default=24)
  parser.add_argument("--commands", default="verify,scan,train")
  args = parser.parse_args()
  store = Store(args.store)
  work = Path(args.workdir)
  work.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  n, d = args.scan_latents, store.d_model
  export = dictionary.write(work / "export", "synthetic", {
      "W_enc": rng.normal(size=(n, d)) / np.sqrt(d), "b_enc": np.zeros(n),
      "W_dec": rng.normal(size=(n, d)) / np.sqrt(d), "b_dec": np.zeros(d)}, k=32,
      layout="sparsify")
  commands = {
      "verify": (["sae_jax.store", f"--store={args.store}"], store.rows),
      "scan": (["sae_jax.scan", f"--sae={export}", f"--store={args.store}",
                f"--out={work / 'scan'}", "--top_n=4"], store.rows),
      "train": (["sae_jax.train", f"--store={args.store}", f"--workdir={work / 'train'}",
                 f"--num_latents={n}", "--k=32", f"--batch_size={args.batch_size}",
                 f"--steps={args.train_steps}", f"--log_every={args.train_steps}",
                 f"--shuffle_buffer_mb={args.shuffle_buffer_mb}", "--lr_warmup_steps=0"],
                args.train_steps * args.batch_size),
  }
  for name in args.commands.split(","):
    command, rows = commands[name]
    for old in ("scan", "train"):
      subprocess.run(["rm", "-rf", str(work / old)], check=True)
    rss, seconds = peak_rss(command)
    print(json.dumps({"command": name, "store": args.store, "rows": store.rows,
                      "store_mib": round(store.rows * store.row_bytes / 2**20),
                      "peak_rss_mib": round(rss), "seconds": round(seconds, 1),
                      "rows_per_s": round(rows / seconds)}), flush=True)


if __name__ == "__main__":
  main()
