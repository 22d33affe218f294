"""EleutherAI sparsify's training step, timed like `python -m sae_jax.bench`.

Not part of the project (it needs torch and sparsify); run it with a separate environment:

  python -m venv /tmp/spvenv && /tmp/spvenv/bin/pip install torch==2.14.1 eai-sparsify
  SPARSIFY_DISABLE_TRITON=1 /tmp/spvenv/bin/python benchmarks/sparsify_compare.py \
      --d_in=512 --num_latents=16384 --k=32 --batch_size=4096

One step is what sparsify's Trainer does per batch with `--optimizer=adam`: unit-norm the decoder,
forward (fused top-k encoder, sparse decoder, FVU; AuxK is skipped while no latent is dead),
backward, remove the gradient parallel to the decoder rows, torch.optim.Adam step, dead-latent
bookkeeping.
On `--device=cuda` sparsify runs as its Trainer does there: float32 parameters and Adam state, the
forward under its own bfloat16 autocast, its Triton sparse decoder (unless SPARSIFY_DISABLE_TRITON=1).
Prints one JSON line with the same keys as sae_jax.bench (no floor); step_cpu_ms is process CPU
time, a cross-check on a busy host.
"""

import argparse
import json
import os
import platform
import time

import numpy as np
import torch
from sparsify import SparseCoder, SparseCoderConfig


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--d_in", type=int, default=512)
  parser.add_argument("--num_latents", type=int, default=16384)
  parser.add_argument("--k", type=int, default=32)
  parser.add_argument("--batch_size", type=int, default=4096)
  parser.add_argument("--multi_topk", action="store_true")
  parser.add_argument("--auxk_alpha", type=float, default=1 / 32)
  parser.add_argument("--dead_tokens", type=int, default=10_000_000,
                      help="as sae_jax.bench: 0 runs AuxK in every timed step")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--device", default="cpu", help="cpu or cuda")
  args = parser.parse_args()
  device = torch.device(args.device)

  torch.manual_seed(0)
  cfg = SparseCoderConfig(num_latents=args.num_latents, k=args.k, multi_topk=args.multi_topk)
  sae = SparseCoder(args.d_in, cfg, device=device, dtype=torch.float32)
  lr = 2e-4 / (args.num_latents / 2**14) ** 0.5
  optimizer = torch.optim.Adam(sae.parameters(), lr=lr, eps=6.25e-10)
  tokens_since_fired = torch.zeros(args.num_latents, dtype=torch.long, device=device)
  x = torch.randn(args.batch_size, args.d_in, device=device)

  def step():
    sae.set_decoder_norm_to_unit_norm()
    dead_mask = tokens_since_fired > args.dead_tokens
    out = sae(x, dead_mask=dead_mask)
    loss = out.fvu + args.auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8
    loss.backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    optimizer.step()
    optimizer.zero_grad()
    tokens_since_fired.add_(args.batch_size)
    tokens_since_fired[out.latent_indices.flatten()] = 0
    return loss.item()

  times = []
  for i in range(args.warmup + args.steps):
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    if i >= args.warmup:
      times.append((time.perf_counter() - wall, time.process_time() - cpu))
  step_ms, step_cpu_ms = np.median(np.array(times), axis=0) * 1e3
  print(json.dumps({
      "tokens_per_s": round(float(args.batch_size / step_ms * 1e3), 1),
      "step_ms": round(float(step_ms), 2),
      "step_cpu_ms": round(float(step_cpu_ms), 2),
      "config": {**vars(args),
                 # sparsify's forward autocasts to bfloat16 on CUDA (parameters stay float32)
                 "dtype": "bfloat16 autocast" if device.type == "cuda" else "float32",
                 "SPARSIFY_DISABLE_TRITON": os.environ.get("SPARSIFY_DISABLE_TRITON")},
      "device": (f"cuda:{torch.cuda.get_device_name()}" if device.type == "cuda"
                 else f"cpu:{platform.machine()} threads={torch.get_num_threads()}"),
      "torch": torch.__version__,
  }))


if __name__ == "__main__":
  main()
