#!/usr/bin/env bash
# The one prepared check for a lent GPU machine, under 10 minutes: at the paper's size (d=4096,
# n=131,072, k=256, bf16 matmuls), our step against sparsify's at batch 4,096 and 16,384, and the
# step of each architecture (TopK, BatchTopK, Matryoshka over each) at 4,096, and TopK with unit
# decoder rows (sparsify's recipe; free norms are the default), each with its floor fraction.
# Writes $OUT/gpu_check.json (docs/benchmarks.md quotes it) and exits non-zero if a run gave
# neither a result nor an error (a timeout: each run has 70 s).
#
#   OUT=/tmp/gpu_check bash benchmarks/gpu_check.sh
#   OUT=/tmp/gpu_check_smoke bash benchmarks/gpu_check.sh --smoke   # tiny sizes, on the CPU
#
# --smoke checks the plumbing anywhere: the same runs at a tiny size, 2 steps each, sparsify on the
# CPU (skipped where sparsify is not installed). Never a test dependency.
set -u
START=$SECONDS
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
: > "$RESULTS"
SMOKE=0
if [ "${1:-}" = "--smoke" ]; then
  SMOKE=1
  SIZE="--d_in=64 --num_latents=1024 --k=8"
  BIG_BATCH=1024 PREFIXES=128,512 STEPS=2 WARMUP=1 RUN_TIMEOUT=300 SPARSIFY_DEVICE=cpu
else
  # Eight runs of at most 70 s each (gpu_bench.sh's paper-size steps took < 0.2 s on an H100).
  SIZE="--d_in=4096 --num_latents=131072 --k=256"
  BIG_BATCH=16384 PREFIXES=8192,32768 STEPS=10 WARMUP=2 RUN_TIMEOUT=70
fi
source benchmarks/gpu_common.sh
versions 2>&1 | tee "$OUT/versions.txt"

OURS="$SIZE --compute_dtype=bfloat16"
if [ $SMOKE = 1 ] && ! python3 -c "import sparsify" 2> /dev/null; then
  theirs() { echo "{\"run\": \"sparsify $1\", \"skipped\": \"sparsify not installed\"}" >> "$RESULTS"; }
fi
ours topk-b4096 $OURS --batch_size=4096
ours topk-unit-rows-b4096 $OURS --batch_size=4096 --decoder_norm=unit
theirs b4096 $SIZE --batch_size=4096
ours topk-b$BIG_BATCH $OURS --batch_size=$BIG_BATCH
theirs b$BIG_BATCH $SIZE --batch_size=$BIG_BATCH
ours batchtopk-b4096 $OURS --batch_size=4096 --architecture=batchtopk
ours matryoshka-topk-b4096 $OURS --batch_size=4096 --matryoshka_prefixes=$PREFIXES
ours matryoshka-batchtopk-b4096 $OURS --batch_size=4096 --architecture=batchtopk \
  --matryoshka_prefixes=$PREFIXES

python3 - "$RESULTS" "$OUT/gpu_check.json" "$OUT/versions.txt" $((SECONDS - START)) $SMOKE \
  $BIG_BATCH <<'PY'
import json, sys
results, out, versions, elapsed, smoke, big = sys.argv[1:]
# (ours, sparsify's) run names of the same configuration
pairs = {"topk-b4096": "b4096", f"topk-b{big}": f"b{big}"}
runs = {}
for line in open(results):
  if line.startswith("{"):
    run = json.loads(line)
    runs[run.pop("run")] = run
  elif ": " in line:  # a run that failed, e.g. sparsify's out of memory at 16,384 tokens
    name, error = line.strip().split(": ", 1)
    runs.setdefault(name, {"error": error})
expected = ([f"ours {name}" for name in pairs] + [f"sparsify {name}" for name in pairs.values()]
            + [f"ours {name}-b4096" for name in ("topk-unit-rows", "batchtopk",
                                                  "matryoshka-topk", "matryoshka-batchtopk")])
missing = [name for name in expected if name not in runs]
ratios = {}
for ours, theirs in pairs.items():
  a, b = runs.get(f"ours {ours}", {}), runs.get(f"sparsify {theirs}", {})
  if "tokens_per_s" in a and "tokens_per_s" in b:
    ratios[ours] = round(a["tokens_per_s"] / b["tokens_per_s"], 3)
topk = runs.get("ours topk-b4096", {}).get("step_ms")
step_vs_topk = {name: round(run["step_ms"] / topk, 3) for name, run in runs.items()
                if topk and name.startswith("ours") and name.endswith("-b4096") and "step_ms" in run}
report = {"smoke": smoke == "1", "elapsed_s": int(elapsed), "versions": open(versions).read(),
          "summary": {name: {key: run.get(key) for key in ("tokens_per_s", "step_ms", "floor_ms",
                                                           "floor_fraction", "skipped", "error")
                             if key in run} for name, run in runs.items()},
          "ours_over_sparsify_tokens_per_s": ratios, "step_over_topk_step": step_vs_topk,
          "missing": missing, "runs": runs}
json.dump(report, open(out, "w"), indent=1)
print(json.dumps({key: report[key] for key in ("summary", "ours_over_sparsify_tokens_per_s",
                                               "step_over_topk_step", "missing", "elapsed_s")},
                 indent=1))
sys.exit(1 if missing else 0)
PY
