#!/usr/bin/env bash
# The whole pipeline on a tiny LLaVA-NeXT built locally (no download), on CPU.
# Every stage resumes or skips finished work, so rerunning this script is cheap.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/quickstart}
mkdir -p "$OUT"

# --- Harvest: tiny model, synthetic images, one activation store per layer, verified. ---
python -m harvest.tiny --kind=llava_next --out="$OUT/model"
python -m harvest.images --out="$OUT/images" --num=64
python -m harvest --model="$OUT/model" --layers=1 --images="$OUT/images" --out="$OUT/store" \
  --tokens=base_patches --prompt_mode=bare --batch_size=8 --shard_images=16 --store_dtype=float32 \
  --torch_threads=1  # the tiny model gains nothing from more threads
python -m sae_jax.store --store="$OUT/store/layer_1"
echo "quickstart: tiny model in $OUT/model, images in $OUT/images, store in $OUT/store/layer_1"
