#!/usr/bin/env bash
# The one prepared check for a lent GPU machine, under 10 minutes: at the paper's size (d=4096,
# n=131,072, k=256, bf16 matmuls), our step against sparsify's at batch 4,096 and 16,384, and the
# step of each architecture (TopK, BatchTopK, Matryoshka over each) at 4,096, and TopK with unit
# decoder rows (sparsify's recipe; free norms are the default), each with its floor fraction; a
# profile of the TopK and BatchTopK steps (GPU ms per op: where the optimizer's passes and
# BatchTopK's extra time go). Then, in what is left of BUDGET seconds (default 570), SynthSAEBench
# at full size where it fits: the SynthSAEBench-16k model, width 4096, k 25, SYNTH_ROWS samples
# (default 4M, one pass; the published runs see 200M), ours and SAELens's Matryoshka BatchTopK,
# then BatchTopK, on the same batches at each of SYNTH_LRS (default 2e-3,5e-3) decayed linearly to 0
# (SYNTH_DECAY=constant: not; at full size a constant lr stops learning), a latent dead after
# SYNTH_DEAD_TOKENS (default 10240: 10 steps, what fresh samples need), scored by SAELens.
# Writes $OUT/gpu_check.json (docs/benchmarks.md quotes it; written before SynthSAEBench starts
# and again after it) and exits non-zero if a run gave neither a result nor an error (a timeout:
# each step run has 70 s). Needs sae-lens and sparsify as wheels in .whl/
# (benchmarks/gpu_wheels.sh fetches them).
#
#   OUT=/tmp/gpu_check bash benchmarks/gpu_check.sh
#   OUT=/tmp/gpu_check_smoke bash benchmarks/gpu_check.sh --smoke   # tiny sizes, on the CPU
#
# --smoke checks the plumbing anywhere: the same runs at a tiny size, 2 steps each, sparsify on the
# CPU (skipped where sparsify is not installed), SynthSAEBench's scaled model (its build takes ~3
# min on a 2-core CPU). Never a test dependency.
set -u
START=$SECONDS
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
SYNTH_DIR=${SYNTH_DIR:-/tmp/gpu_check_synthbench}
: > "$RESULTS"
SMOKE=0
if [ "${1:-}" = "--smoke" ]; then
  SMOKE=1
  SIZE="--d_in=64 --num_latents=1024 --k=8"
  BIG_BATCH=1024 PREFIXES=128,512 STEPS=2 WARMUP=1 RUN_TIMEOUT=300 SPARSIFY_DEVICE=cpu
  SYNTH="--model=small --rows=${SYNTH_ROWS:-8192} --num_latents=256 --k=8 --samples=4096 \
    --warmup=2 --device=cpu"
  BUDGET=${BUDGET:-1200}
else
  # Eight runs of at most 70 s each (gpu_bench.sh's paper-size steps took < 0.2 s on an H100).
  SIZE="--d_in=4096 --num_latents=131072 --k=256"
  BIG_BATCH=16384 PREFIXES=8192,32768 STEPS=10 WARMUP=2 RUN_TIMEOUT=70
  SYNTH="--model=synth16k --rows=${SYNTH_ROWS:-4000000} --num_latents=4096 --k=25 \
    --samples=100000 --warmup=100 --device=cuda"
  BUDGET=${BUDGET:-570}
fi
source benchmarks/gpu_common.sh
versions 2>&1 | tee "$OUT/versions.txt"

OURS="$SIZE --compute_dtype=bfloat16"
if [ $SMOKE = 1 ] && ! python3 -c "import sparsify" 2> /dev/null; then
  theirs() { echo "{\"run\": \"sparsify $1\", \"skipped\": \"sparsify not installed\"}" >> "$RESULTS"; }
fi
ours topk-b4096 $OURS --batch_size=4096 --profile_dir="$OUT/profile-topk"
ours topk-unit-rows-b4096 $OURS --batch_size=4096 --decoder_norm=unit
theirs b4096 $SIZE --batch_size=4096
ours topk-b$BIG_BATCH $OURS --batch_size=$BIG_BATCH
theirs b$BIG_BATCH $SIZE --batch_size=$BIG_BATCH
ours batchtopk-b4096 $OURS --batch_size=4096 --architecture=batchtopk \
  --profile_dir="$OUT/profile-batchtopk"
ours matryoshka-topk-b4096 $OURS --batch_size=4096 --matryoshka_prefixes=$PREFIXES
ours matryoshka-batchtopk-b4096 $OURS --batch_size=4096 --architecture=batchtopk \
  --matryoshka_prefixes=$PREFIXES

for arch in topk batchtopk; do  # GPU ms per op of 3 steps, per step; the raw trace stays behind
  [ -d "$OUT/profile-$arch" ] && python3 benchmarks/trace_summary.py "$OUT/profile-$arch" \
    --top=40 > "$OUT/profile-$arch.txt" 2>&1 && rm -rf "$OUT/profile-$arch"
done

report() {
python3 - "$RESULTS" "$OUT/gpu_check.json" "$OUT/versions.txt" $((SECONDS - START)) $SMOKE \
  $BIG_BATCH "$OUT" "$SYNTH_DIR" <<'PY'
import json, pathlib, sys
results, out, versions, elapsed, smoke, big, folder, synth = sys.argv[1:]
folder, synth = pathlib.Path(folder), pathlib.Path(synth)
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
          "missing": missing, "runs": runs,
          "profiles": {p.stem: p.read_text() for p in sorted(folder.glob("profile-*.txt"))}}
if (folder / "synthbench.log").exists():
  report["synthbench"] = {
      "runs": [json.loads(line) for line in (synth / "results.jsonl").read_text().splitlines()]
              if (synth / "results.jsonl").exists() else [],
      "log_tail": (folder / "synthbench.log").read_text()[-3000:]}
json.dump(report, open(out, "w"), indent=1)
print(json.dumps({key: report[key] for key in ("summary", "ours_over_sparsify_tokens_per_s",
                                               "step_over_topk_step", "missing", "elapsed_s")},
                 indent=1))
sys.exit(1 if missing else 0)
PY
}
report
STATUS=$?

# SynthSAEBench at full size, where it fits in what is left of BUDGET (synthbench.py resumes; its
# store and SAEs stay out of $OUT, which comes back to the caller).
LEFT=$((BUDGET - (SECONDS - START)))
if [ $LEFT -gt 60 ]; then
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout $LEFT python3 benchmarks/synthbench.py \
    --workdir="$SYNTH_DIR" $SYNTH \
    --dtype=bfloat16 --batch_size=1024 --lrs="${SYNTH_LRS:-2e-3,5e-3}" \
    --lr_decay="${SYNTH_DECAY:-linear}" --dead_tokens="${SYNTH_DEAD_TOKENS:-10240}" \
    --architectures=matryoshka-batchtopk,batchtopk > "$OUT/synthbench.log" 2>&1
  echo "synthbench: exit $? after $((SECONDS - START)) s" | tee -a "$OUT/synthbench.log"
  report > /dev/null
fi
exit $STATUS
