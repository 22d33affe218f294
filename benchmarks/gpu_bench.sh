#!/usr/bin/env bash
# Everything we measure on a lent GPU machine, in one call (docs/benchmarks.md, "Training step on
# a GPU"): versions, the sparse-gradient and top-k tests on the GPU, our training step against its
# floor, and EleutherAI sparsify's step on the same configurations.
#
#   OUT=/tmp/gpu_bench bash benchmarks/gpu_bench.sh
#
# sparsify and its pure-Python dependencies are installed from wheels in .whl/ when that folder
# exists (benchmarks/gpu_common.sh); the rest (jax with CUDA, flax, optax, torch, triton) is the
# machine's own. Results go to $OUT/results.jsonl, one JSON line each,
# and where the paper-size step's GPU time goes to $OUT/paper_trace.txt.
set -u
OUT=${OUT:-/tmp/gpu_bench}
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
source benchmarks/gpu_common.sh

versions
python3 -c "import torch; print('torch', torch.__version__)"

# The sparse gradients (scatter, matmul and the GPU's own "auto" choices) against autodiff, and
# the grouped top-k against lax.top_k, on the GPU. Highest matmul precision: the tests'
# tolerances are float32's, not TF32's.
JAX_DEFAULT_MATMUL_PRECISION=highest timeout 240 python3 -m pytest -q -x -p no:cacheprovider \
  tests/test_model.py tests/test_topk.py 2>&1 | tail -3

SMALL="--d_in=512 --num_latents=16384 --k=32 --batch_size=4096"
PAPER="--d_in=4096 --num_latents=131072 --k=256 --batch_size=4096"
ours small-f32 $SMALL --compute_dtype=float32
ours small-bf16 $SMALL --compute_dtype=bfloat16
theirs small $SMALL
ours paper $PAPER --compute_dtype=bfloat16 --profile_dir=/tmp/profile_paper
ours paper-scatter $PAPER --compute_dtype=bfloat16 --weight_grads=scatter
theirs paper $PAPER
# --dead_tokens=0: every latent that missed the last batch is dead, so AuxK runs in every step.
ours paper-auxk $PAPER --compute_dtype=bfloat16 --dead_tokens=0
theirs paper-auxk $PAPER --dead_tokens=0
ours paper-b16384 $PAPER --compute_dtype=bfloat16 --batch_size=16384
python3 benchmarks/trace_summary.py /tmp/profile_paper --top=20 > "$OUT/paper_trace.txt"

python3 - "$RESULTS" <<'PY'
import json, sys
print(f"{'run':24} {'tokens/s':>12} {'step ms':>9} {'floor ms':>9} {'floor frac':>10}")
for line in open(sys.argv[1]):
  if not line.startswith("{"):
    continue
  r = json.loads(line)
  print(f"{r['run']:24} {r['tokens_per_s']:>12,.0f} {r['step_ms']:>9.2f} "
        f"{r.get('floor_ms', float('nan')):>9.2f} {r.get('floor_fraction', float('nan')):>10.3f}")
PY
