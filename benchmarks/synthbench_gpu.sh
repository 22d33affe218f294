#!/usr/bin/env bash
# SynthSAEBench at the published size on a lent GPU machine (docs/benchmarks.md, "SynthSAEBench"):
# the rebuilt SynthSAEBench-16k model, width 4096, k 25, 200M training samples, batch 1024, constant
# lr 3e-4 without warmup, Matryoshka widths 128,512,2048,4096 with per-level AuxK, a latent dead
# after 1000 steps (the published settings: synth-sae-bench-experiments' sweeps/common.py and
# SAELens's SyntheticSAERunnerConfig defaults), ours and SAELens's trainers on the same batches,
# scored on 100,000 samples by SAELens's eval_sae_on_synthetic_data.
#
#   OUT=/tmp/synthbench16k ARCHS=batchtopk,matryoshka-batchtopk bash benchmarks/synthbench_gpu.sh
#
# 200M rows of d=768 do not fit the machine's 64 GiB disk in any dtype we store, so the store holds
# ROWS (default 25M rows of bfloat16, 38 GB) and training takes 195,312 steps over it (8 passes, in
# our trainer's order): the published runs draw 200M fresh samples. DEAD_TOKENS=10240 trains
# with a 10-step dead window instead, the better one for BatchTopK on fresh samples
# (docs/benchmarks.md, "Fresh samples need a short dead window"). Rerunning resumes: the store
# after its last shard, the runs after the last finished one (OUT/results.jsonl).
set -eu
OUT=${OUT:-/tmp/synthbench16k}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 benchmarks/synthbench.py --workdir="$OUT" --model=synth16k --rows="${ROWS:-25000000}" \
  --dtype=bfloat16 --num_latents=4096 --k=25 --batch_size=1024 --steps=195312 --warmup=0 \
  --dead_tokens="${DEAD_TOKENS:-1024000}" --lrs="${LRS:-3e-4}" --samples=100000 --device=cuda \
  --architectures="${ARCHS:-topk,batchtopk,matryoshka-topk,matryoshka-batchtopk}"
cat "$OUT/table.md"
