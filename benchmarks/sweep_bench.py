"""A sweep of N SAEs in one `sae_jax.train` against the N runs one by one, on the same store.

  python benchmarks/synthetic_store.py --out=/tmp/sweep_store --d_model=256 --images=540
  python benchmarks/sweep_bench.py --store=/tmp/sweep_store --out=/tmp/sweep_bench \
      --specs='--lr=1e-4' --specs='--lr=2e-4' --specs='--lr=4e-4' --specs='--lr=8e-4' --repeats=2

Prints one JSON line per command: its wall time (process start to exit: imports, store checks,
compiles, training), the CPU time of all its threads, and the tokens/s per SAE in the steady state (the median of the logged
intervals after the first, which holds the compile). Sweeps and separate runs take turns.
"""

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def train(store, workdir, common, extra):
  """(wall seconds, CPU seconds of all its threads) of one `sae_jax.train` command."""
  start, cpu = time.perf_counter(), children_cpu_s()
  result = subprocess.run([sys.executable, "-m", "sae_jax.train", f"--store={store}",
                           f"--workdir={workdir}", *common, *extra], capture_output=True, text=True)
  if result.returncode:
    raise SystemExit(result.stderr[-3000:])
  return time.perf_counter() - start, children_cpu_s() - cpu


def children_cpu_s():
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def steady_tokens_per_s(workdir):
  rates = [json.loads(line)["tokens_per_s"] for line in open(Path(workdir) / "metrics.jsonl")]
  return statistics.median(rates[1:])


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--store", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--specs", action="append", required=True, help="one member's flags")
  parser.add_argument("--repeats", type=int, default=1)
  parser.add_argument("--common", default="--expansion_factor=16 --k=32 --batch_size=1024 "
                      "--steps=300 --log_every=50 --checkpoint_every=1000 --lr_warmup_steps=10")
  args = parser.parse_args()
  common = args.common.split()
  for repeat in range(args.repeats):
    root = Path(args.out) / str(repeat)
    shutil.rmtree(root, ignore_errors=True)
    wall, cpu = train(args.store, root / "sweep", common, [f"--sae={s}" for s in args.specs])
    members = json.loads((root / "sweep" / "sweep.json").read_text())["members"]
    rates = [steady_tokens_per_s(m["workdir"]) for m in members]
    print(json.dumps({"mode": "sweep", "saes": len(rates), "wall_s": round(wall, 1),
                      "cpu_s": round(cpu, 1),
                      "tokens_per_s_per_sae": [round(r) for r in rates]}), flush=True)
    walls, cpus, rates = [], [], []
    for i, spec in enumerate(args.specs):
      wall, cpu = train(args.store, root / f"run{i}", common, spec.split())
      walls.append(wall)
      cpus.append(cpu)
      rates.append(steady_tokens_per_s(root / f"run{i}"))
    print(json.dumps({"mode": "separate", "saes": len(rates), "wall_s": round(sum(walls), 1),
                      "cpu_s": round(sum(cpus), 1),
                      "wall_s_each": [round(w, 1) for w in walls],
                      "tokens_per_s_per_sae": [round(r) for r in rates]}), flush=True)


if __name__ == "__main__":
  main()
