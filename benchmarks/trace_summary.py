"""Where the time of a traced run goes: total duration per op name, per device track.

  python -m sae_jax.bench ... --profile_dir=/tmp/prof
  python benchmarks/trace_summary.py /tmp/prof [--top=25] [--per=3]

Reads the newest perfetto_trace.json.gz under the folder (jax.profiler writes one per trace) and
prints, for every process whose name matches --process (default: GPU/TPU devices, else the host),
the ops with the largest summed durations, divided by --per (the number of traced steps).
"""

import argparse
import collections
import gzip
import json
import pathlib
import re


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("folder", type=pathlib.Path)
  parser.add_argument("--top", type=int, default=25)
  parser.add_argument("--per", type=int, default=3, help="divide totals by this (traced steps)")
  parser.add_argument("--process", default=r"/device:(GPU|TPU)", help="regex on process names")
  args = parser.parse_args()

  trace_path = max(args.folder.rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
  events = json.load(gzip.open(trace_path))["traceEvents"]
  process_names = {e["pid"]: e["args"]["name"] for e in events
                   if e.get("ph") == "M" and e.get("name") == "process_name"}
  wanted = {pid for pid, name in process_names.items() if re.search(args.process, name)}
  if not wanted:  # a CPU run: the host's XLA threads
    wanted = set(process_names)
  totals = collections.defaultdict(collections.Counter)
  for e in events:
    if e.get("ph") == "X" and e["pid"] in wanted and not e["name"].startswith("$"):
      totals[process_names[e["pid"]]][e["name"]] += e["dur"] / 1e3 / args.per
  for process, ops in totals.items():
    print(f"== {process}: {sum(ops.values()):.2f} ms per step in {len(ops)} ops")
    for name, ms in ops.most_common(args.top):
      print(f"{ms:9.3f} ms  {name[:110]}")


if __name__ == "__main__":
  main()
