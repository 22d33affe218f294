"""Scaled SynthSAEBench: our trainer against SAELens's on the same samples, scored by SAELens.

  python benchmarks/synthbench.py --workdir=/tmp/synthbench  (CPU: model + store ~12 min, ~15 s a run)
  python benchmarks/synthbench.py --workdir=W --architectures=batchtopk,matryoshka-batchtopk
  python benchmarks/synthbench.py --workdir=W --model=synth16k --rows=200000000 --num_latents=4096 \
      --k=25 --lrs=3e-4 --samples=100000 --device=cuda              (the published size, a GPU)

1. `eval.synthetic write` writes --rows samples of the --model (default: `small`, SynthSAEBench's
   structure at 4096 features in d=256) into WORKDIR/store (reused when present).
2. Ours, per architecture and --lrs value: `python -m sae_jax.train` on the store (one pass,
   --batch_size rows a step, --decoder_norm: free by default, as the trainer's),
   `sae_jax.export --format=saelens` (BatchTopK exports as JumpReLU). Matryoshka prefixes are
   SynthSAEBench's own (128, 512, 2048 below the width, then the width) unless
   --matryoshka_prefixes says otherwise.
3. SAELens's, the same: its SAETrainer (TopKTrainingSAE, BatchTopKTrainingSAE,
   MatryoshkaBatchTopKTrainingSAE) fed the SAME batches in the SAME order (our trainer's own data
   reader and order, from the resolved flags.json of our run at that lr), same width, k, steps,
   warmup and lr (constant, or --lr_decay=linear to 0 at the last step on both), a latent dead
   after as many steps as ours (--dead_tokens / batch), its Matryoshka with the same prefixes and
   its per-level AuxK (as SynthSAEBench trains it);
   b_dec starts at the mean of 16,384 store rows (its bare trainer starts it at zero; ours starts
   at the geometric median); saved as its inference SAE.
4. Every SAE is scored by `eval.synthetic score` (SAELens's eval_sae_on_synthetic_data, the same
   --samples held-out seeded samples for all) as trained, and at mean L0 k (`--l0`: a JumpReLU's
   threshold scaled to fire k times a row on other fresh samples; F1 moves with the L0, so the
   sides are compared there); each side's row is its best lr by F1 at L0 k. Runs of a
   results.jsonl scored before (SCORING) are scored again while their export is there.
Writes WORKDIR/results.jsonl (every run) and WORKDIR/table.md (the best per side), beside SAELens's
published SynthSAEBench-16k numbers, which are at full size (width 4096, L0 25, 200M samples).
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from eval import synthetic  # noqa: E402
from sae_jax import data# noqa: E402
from sae_jax.store import Store  # noqa: E402

# Ours trains all four; SAELens has no Matryoshka TopK training SAE.
ARCHITECTURES = ("topk", "batchtopk", "matryoshka-topk", "matryoshka-batchtopk")
PUBLISHED = [  # SAELens docs/synth_sae_bench.md, SynthSAEBench-16k, width 4096, L0 25, 200M samples
    ("BatchTopK", 0.732, 0.757), ("Matryoshka BatchTopK", 0.879, 0.793), ("JumpReLU", 0.732, 0.753)]


def run(*args: str) -> str:
  result = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT)
  if result.returncode:
    raise RuntimeError(f"{' '.join(args[:3])} failed: {result.stderr[-3000:]}"
                       f"{result.stdout[-2000:]}")
  return result.stdout


def prefixes(args) -> list[int]:
  """--matryoshka_prefixes, or SynthSAEBench's own: 128, 512 and 2048 where below the width, then
  the width (its experiments' get_matryoshka_config)."""
  if args.matryoshka_prefixes:
    return [int(p) for p in args.matryoshka_prefixes.split(",")]
  return [p for p in (128, 512, 2048) if p < args.num_latents] + [args.num_latents]


def train_ours(args, arch: str, lr: float, workdir: Path) -> None:
  flags = [f"--store={args.workdir / 'store'}", f"--workdir={workdir}",
           f"--num_latents={args.num_latents}", f"--k={args.k}", f"--batch_size={args.batch_size}",
           f"--steps={args.steps}", f"--lr={lr}", f"--lr_warmup_steps={args.warmup}",
           f"--seed={args.seed}", f"--decoder_norm={args.decoder_norm}", "--log_every=50",
           f"--lr_decay={args.lr_decay}"]
  if args.dead_tokens:
    flags.append(f"--dead_tokens={args.dead_tokens}")
  if "batchtopk" in arch:  # its threshold is learned from a quarter of the run on
    flags += ["--architecture=batchtopk", f"--threshold_start_step={max(1, args.steps // 4)}"]
  if arch.startswith("matryoshka"):
    flags.append("--matryoshka_prefixes=" + ",".join(map(str, prefixes(args))))
  run("-m", "sae_jax.train", *flags)
  run("-m", "sae_jax.export", f"--workdir={workdir}", f"--out={workdir / 'export'}",
      "--format=saelens")


def our_batches(workdir: Path):
  """Our trainer's batches of the run at `workdir`, in its order (its resolved flags)."""
  flags = json.loads((workdir / "flags.json").read_text())
  store = Store(flags["store"])
  reader = data.ChunkReader(store, flags.get("token_kinds") or None,
                            chunk_bytes=flags["read_chunk_kb"] << 10, read_threads=4)
  orders = data.lane_orders(reader, lanes=max(1, flags.get("data_lanes", 0)),
                            buffer_bytes=flags["shuffle_buffer_mb"] << 20, seed=flags["seed"],
                            process_index=0, process_count=1)
  return data.batches(reader, orders, batch_rows=flags["batch_size"])


def train_saelens(args, arch: str, lr: float, ours: Path, out: Path) -> None:
  from sae_lens import (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, LoggingConfig,
                        MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig,
                        SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig)
  from sae_lens.config import SAETrainerConfig
  d_in = Store(args.workdir / "store").d_model
  common = dict(d_in=d_in, d_sae=args.num_latents, k=args.k, device=args.device)
  if arch == "topk":
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(**common))
  elif arch == "batchtopk":
    sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**common))
  elif arch == "matryoshka-batchtopk":
    sae = MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(
        **common, matryoshka_widths=prefixes(args), use_matryoshka_aux_loss=True))
  else:
    raise ValueError(f"SAELens has no {arch} training SAE")
  batches = our_batches(ours)
  first = torch.from_numpy(np.asarray(next(batches), np.float32))
  with torch.no_grad():  # a data-based b_dec, as ours has (its bare trainer starts at zero)
    sae.b_dec.copy_(first[:16_384].mean(0).to(sae.b_dec))
  batches = our_batches(ours)  # the same stream from its first batch
  provider = (torch.from_numpy(np.asarray(next(batches), np.float32)).to(args.device)
              for _ in range(args.steps))
  dead_tokens = json.loads((ours / "flags.json").read_text())["dead_tokens"]
  cfg = SAETrainerConfig(
      total_training_samples=args.steps * args.batch_size, train_batch_size_samples=args.batch_size,
      lr=lr, lr_end=lr, lr_scheduler_name="constant", lr_warm_up_steps=args.warmup,
      # --lr_decay=linear: from the end of the warmup down to 0 at the last step, as ours (its
      # warmup starts at lr / warmup where ours starts at 0: one step ahead)
      lr_decay_steps=(args.steps - args.warmup) if args.lr_decay == "linear" else 0,
      dead_feature_window=max(1, dead_tokens // args.batch_size),  # ours: --dead_tokens
      device=args.device, n_checkpoints=0, save_final_checkpoint=False,
      logger=LoggingConfig(log_to_wandb=False, eval_every_n_wandb_logs=2 ** 31 - 1))
  torch.manual_seed(args.seed)
  trained = SAETrainer(cfg=cfg, sae=sae, data_provider=provider).fit()
  trained.save_inference_model(out)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", type=Path, required=True)
  parser.add_argument("--model", default="small", choices=list(synthetic.MODELS))
  parser.add_argument("--rows", type=int, default=262_144)
  parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                      help="the store's dtype")
  parser.add_argument("--num_latents", type=int, default=1024)
  parser.add_argument("--k", type=int, default=12)
  parser.add_argument("--batch_size", type=int, default=1024)
  parser.add_argument("--steps", type=int, default=0, help="0: one pass over --rows (more: "
                      "further passes, in our trainer's order)")
  parser.add_argument("--warmup", type=int, default=20)
  parser.add_argument("--lrs", default="1e-3,2e-3,3e-3,5e-3,1e-2,2e-2")
  parser.add_argument("--architectures", default=",".join(ARCHITECTURES))
  parser.add_argument("--sides", default="ours,saelens")
  parser.add_argument("--decoder_norm", default="free", choices=["unit", "free"],
                      help="our trainer's --decoder_norm (SAELens's TopK and BatchTopK trainers "
                      "have free norms)")
  parser.add_argument("--matryoshka_prefixes", default="", help="comma-separated prefix widths "
                      "of both sides' Matryoshkas (default: SynthSAEBench's 128,512,2048 below the "
                      "width, then the width)")
  parser.add_argument("--dead_tokens", type=int, default=0, help="our trainer's --dead_tokens, "
                      "and SAELens's dead window in steps from it (0: our default, 10M; "
                      "SynthSAEBench trains with 1000 steps of 1024)")
  parser.add_argument("--lr_decay", default="constant", choices=["constant", "linear"],
                      help="both sides' lr after the warmup: constant, or a linear decay to 0 at "
                      "the last step")
  parser.add_argument("--samples", type=int, default=16_384, help="score samples")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--device", default="cpu", help="torch device of SAELens and the "
                      "generator")
  args = parser.parse_args()
  args.steps = args.steps or args.rows // args.batch_size
  args.workdir.mkdir(parents=True, exist_ok=True)
  store = args.workdir / "store"
  synthetic.write_store(store, synthetic.MODELS[args.model](), args.rows, name=args.model,
                        dtype=args.dtype, device=args.device)
  results = args.workdir / "results.jsonl"
  done = {run_key(r): r for r in map(
      json.loads, results.read_text().splitlines() if results.exists() else [])}
  free = args.decoder_norm == "free"  # runs with unit rows predate the knob: named without it
  for arch in args.architectures.split(","):
    for lr in map(float, args.lrs.split(",")):
      variant = run_variant(args, arch)
      suffix = f"{arch}-{lr:g}{variant_suffix(variant)}"
      workdir = args.workdir / f"ours-{'free-' * free}{suffix}"
      for side in args.sides.split(","):
        row = {"side": side, "architecture": arch, "lr": lr, **variant}
        if side == "ours":
          row["decoder_norm"] = args.decoder_norm
        export = workdir / "export" if side == "ours" else args.workdir / f"saelens-{suffix}"
        if side == "saelens" and arch == "matryoshka-topk":
          continue
        if run_key(row) in done:
          row = done[run_key(row)]
          if row.get("scoring") == SCORING or not export.exists():
            continue
          row = {**row, **scores(args, export)}  # a run scored before SCORING: scored again
        else:
          start = time.time()
          if side == "ours" or not (workdir / "flags.json").exists():
            train_ours(args, arch, lr, workdir)
          if side == "saelens":
            train_saelens(args, arch, lr, workdir, export)
          row = {**row, "steps": args.steps, "samples_trained": args.steps * args.batch_size,
                 **scores(args, export), "seconds": round(time.time() - start)}
        done[run_key(row)] = row
        with results.open("a") as f:
          f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
  write_table(args, done)


# Rows scored before version 2 were scored on samples that were the store's first rows, and at
# their trained threshold only: they are scored again while their export is there.
SCORING = 2
AT_K = ("f1", "precision", "recall", "explained_variance", "l0")


def scores(args, export: Path) -> dict:
  """SAELens's scores of an export as trained and at mean L0 k: a JumpReLU export (BatchTopK's)
  is scored again with its threshold scaled to fire k times a row (`eval.synthetic score --l0`);
  a TopK export fires k times a row as it is."""
  def score(l0):
    return synthetic.score(export, args.workdir / "store", samples=args.samples, batch_size=4096,
                           seed=args.seed, device=args.device, l0=l0)

  trained = score(None)
  at_k = score(args.k) if trained["architecture"] == "jumprelu" else trained
  return {**{k: trained[k] for k in ("f1", "mcc", "precision", "recall", "uniqueness",
                                     "explained_variance", "l0", "dead_latents")},
          **{f"{k}_at_k": at_k[k] for k in AT_K},
          "threshold_scale": at_k.get("threshold_scale", 1.0), "scoring": SCORING}


def run_variant(args, arch: str) -> dict:
  """What a run's identity holds beyond side, architecture, lr and decoder norm."""
  variant = {"prefixes": prefixes(args)} if arch.startswith("matryoshka") else {}
  if args.dead_tokens:
    variant["dead_tokens"] = args.dead_tokens
  if args.lr_decay != "constant":
    variant["lr_decay"] = args.lr_decay
  return variant


def variant_suffix(variant: dict) -> str:
  """Run folders are named for what the variant adds to a run's identity."""
  suffix = ""
  if "prefixes" in variant:
    suffix += "-p" + ".".join(map(str, variant["prefixes"]))
  if "dead_tokens" in variant:
    suffix += f"-dead{variant['dead_tokens']}"
  if "lr_decay" in variant:
    suffix += f"-{variant['lr_decay']}"
  return suffix


def run_key(row: dict) -> tuple:
  """A result's identity: side, architecture, lr, (ours) the decoder norm, the Matryoshka prefixes,
  the dead window and the lr decay (rows from before those were flags have none of them)."""
  norm = row.get("decoder_norm", "unit") if row["side"] == "ours" else None
  return (row["side"], row["architecture"], row["lr"], norm, *variant_key(row))


def variant_key(row: dict) -> tuple:
  return tuple(row.get("prefixes", ())), row.get("dead_tokens"), row.get("lr_decay")


def side_name(row: dict) -> str:
  return "ours, unit rows" if run_key(row)[3] == "unit" else row["side"]


def variant_words(args) -> str:
  """The table header's words for the variant (the Matryoshka prefixes where one ran)."""
  variant = run_variant(args, "matryoshka" if "matryoshka" in args.architectures else "")
  words = ""
  if "prefixes" in variant:
    words += "; Matryoshka prefixes " + ",".join(map(str, variant["prefixes"]))
  if "dead_tokens" in variant:
    words += f"; a latent dead after {variant['dead_tokens']:,} tokens"
  if "lr_decay" in variant:
    words += f"; lr decayed {variant['lr_decay']}ly to 0"
  return words


def f1_at_k(row: dict) -> float:
  """A run's F1 at L0 k (its F1 as trained where its export was gone before that was scored)."""
  return row.get("f1_at_k", row["f1"])


def write_table(args, done: dict) -> None:
  best = {}
  for row in done.values():
    if variant_key(row) != variant_key(run_variant(args, row["architecture"])):
      continue  # another variant's run in the same folder
    key = (row["architecture"], side_name(row))
    if key not in best or f1_at_k(row) > f1_at_k(best[key]):
      best[key] = row
  scaled = "" if args.model == "synth16k" else "Scaled "
  lines = [f"{scaled}SynthSAEBench (`{args.model}`, {args.rows:,} rows), width {args.num_latents}, "
           f"k {args.k}, {args.steps} steps of {args.batch_size}; lrs {args.lrs}, best by F1 at "
           f"L0 {args.k}; scored on {args.samples:,} samples{variant_words(args)}. F1, precision, "
           f"recall and explained variance at mean L0 {args.k} (a JumpReLU's threshold scaled to "
           "it); the last column as trained.", "",
           "| architecture | side | best lr | F1 | precision | recall | explained variance | MCC | "
           "uniqueness | dead | as trained: L0 / F1 |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for (arch, side), r in sorted(best.items()):
    at_k = " | ".join(f"{r[f'{k}_at_k']:.3f}" if f"{k}_at_k" in r else "n/a"
                      for k in ("f1", "precision", "recall", "explained_variance"))
    lines.append(f"| {arch} | {side} | {r['lr']:g} | {at_k} | {r['mcc']:.3f} | "
                 f"{r['uniqueness']:.3f} | {r['dead_latents']} | {r['l0']:.1f} / {r['f1']:.3f} |")
  lines += ["", "SAELens published, SynthSAEBench-16k (width 4096, L0 25, 200M samples):", "",
            "| architecture | F1 | MCC |", "| --- | --- | --- |"]
  lines += [f"| {name} | {f1} | {mcc} |" for name, f1, mcc in PUBLISHED]
  (args.workdir / "table.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
