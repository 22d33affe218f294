#!/usr/bin/env bash
# The whole paper on a miniature world with ground truth (eval.world), on CPU, no download: a
# LLaVA-NeXT trained to caption synthetic scenes, an SAE on its residual stream, explanations by a
# trained LLaVA-OneVision, CLIP scores by a trained CLIP, steering, and every claim checked against
# what the scenes really show. Every stage resumes or skips finished work (the world's models are
# cached by their settings and code), so rerunning this script is cheap.
set -euo pipefail
cd "$(dirname "$0")/.."
# WORLD_SEED=N trains another world (other scenes and weights; docs/benchmarks.md compares five),
# in outputs/quickstart-seedN unless OUT says where.
WORLD_SEED=${WORLD_SEED:-0}
OUT=${OUT:-outputs/quickstart$([ "$WORLD_SEED" = 0 ] || echo "-seed$WORLD_SEED")}
NUM_IMAGES=${NUM_IMAGES:-1024}
mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

# --- The world (minutes, once), and the SAE on the subject while the explainer still trains. ---
# Two processes of one thread each use two cores better than one process of two threads on models
# this small. One lane trains the subject and CLIP, then harvests the subject's layer 0 on held-out
# scenes, verifies the store, trains a TopK SAE, exports and scans it; the other trains the
# explainer, the longest model. The last eval.world call only checks the parts and writes
# world.json.
# The scenes the pipeline looks at were never trained on: they start after the training seeds.
seed=$(python -c "from eval import world
print(world.held_out_seed(world.Settings(seed=$WORLD_SEED)))")
SAE="$OUT/export/model.language_model.layers.0"
subject_lane() {
  python -m eval.world --out="$OUT/world" --seed="$WORLD_SEED" --parts=subject --parts=clip \
    --torch_threads=1
  python -m harvest.images --out="$OUT/images" --num="$NUM_IMAGES" --seed="$seed" --style=world
  python -m harvest --model="$OUT/world/subject" --layers=0 --images="$OUT/images" \
    --out="$OUT/store" --tokens=base_patches --prompt_mode=chat --prompt="Describe the image." \
    --batch_size=16 --shard_images=128 --store_dtype=float32 --torch_threads=1
  python -m sae_jax.store --store="$OUT/store/layer_0"
  # 256 latents for the world's 16 concepts (at 512, more of them split a concept by place).
  python -m sae_jax.train --flagfile=launch/configs/tiny_cpu.flags --store="$OUT/store/layer_0" \
    --workdir="$OUT/sae" --expansion_factor=4
  python -m sae_jax.export --workdir="$OUT/sae" --out="$OUT/export" --format=sparsify
  python -m sae_jax.scan --sae="$OUT/export" --store="$OUT/store/layer_0" --out="$OUT/topacts" \
    --top_n=8
}
subject_lane &
lane=$!
python -m eval.world --out="$OUT/world" --seed="$WORLD_SEED" --parts=explainer --torch_threads=1
wait "$lane"
python -m eval.world --out="$OUT/world" --seed="$WORLD_SEED"
python -c "import json, sys; seed = json.load(open('$OUT/world/world.json'))['held_out_seed']
sys.exit(seed != $seed and f'world.json: held_out_seed {seed}, but the scenes started at $seed')"

# --- Explanations by the world's explainer, CLIP scores, concepts. ---
python -m interpret.explain --topacts="$OUT/topacts" --explainer="hf:$OUT/world/explainer" \
  --out="$OUT/explanations" --num_images=5 --image_size=64 --max_tokens=4 \
  --answer_prefix="[EXPLANATION]:" --concurrency=1  # what eval.world trained the explainer on
python -m eval.clip_score --topacts="$OUT/topacts" --clip_model="local-dir:$OUT/world/clip" \
  --explanations="$OUT/explanations/explanations.jsonl" --out="$OUT/scores"
# Ground truth: harvest.images recorded what it drew (images/concepts.jsonl); which latents find it,
# and do their explanations name it?
python -m eval.concepts --topacts="$OUT/topacts" --concepts="$OUT/images/concepts.jsonl" \
  --explanations="$OUT/explanations/explanations.jsonl" --out="$OUT/concepts"

# --- The dictionary inside the model: spliced-in quality, and steering by the colour latents. ---
python -m eval.sae_quality --model="$OUT/world/subject" --sae="$SAE" --images="$OUT/images" \
  --max_images=64 --tokens=base_patches --dtype=float32 --prompt_mode=chat \
  --prompt="Describe the image." --out="$OUT/quality.json"
python -m eval.steer_concepts --model="$OUT/world/subject" --sae="$SAE" --concepts="$OUT/concepts" \
  --images="$OUT/images" --topacts="$OUT/topacts" --scale=5 --max_images=32 --out="$OUT/steering"

# --- One page with every number, and the feature browser headed by the same claims. ---
python -m eval.report --workdir="$OUT/sae" --clip_scores="$OUT/scores" \
  --sae_quality="$OUT/quality.json" --concepts="$OUT/concepts" --steering="$OUT/steering" \
  --out="$OUT/report"
python -m interpret.dashboard --topacts="$OUT/topacts" --out="$OUT/dashboard" \
  --explanations="$OUT/explanations/explanations.jsonl" --scores="$OUT/scores/per_latent.jsonl" \
  --concepts="$OUT/concepts/per_latent.jsonl" --headline="$OUT/report/headline.json"
claims=$(python -c "
import json
for r in json.load(open('$OUT/report/headline.json'))['rows']:
  print(f\"  {r['claim']}: {r['reached']} ({r['baseline']}; target: {r['target']})\")")
cat <<EOF
quickstart done. Outputs in $OUT:
  world/                the trained subject LLaVA-NeXT, explainer LLaVA-OneVision and CLIP (world.json)
  images/               held-out world scenes and what each one shows (concepts.jsonl)
  store/layer_0/        activation store (docs/formats.md)
  sae/ export/          SAE training run and the exported dictionary (sparsify layout)
  topacts/              top images per latent
  explanations/         explanations.jsonl, from the world's explainer
  scores/               CLIP scores vs baselines
  concepts/             IoU of each latent with the shapes, colours and textures drawn in images/
  steering/             captions with each colour's latent clamped, and with a random latent
  quality.json          FVU, L0, dead latents and next-token loss with the SAE spliced in
  report/report.html    every number on one page; dashboard/index.html the feature browser
Ground truth (report/headline.json, also at the top of the report and the dashboard):
$claims
docs/reproduce_paper.md runs the same pipeline on the paper's models.
EOF
