"""Milliseconds of one training step of each architecture at one size, the steps taking turns.

  python benchmarks/architecture_step_cost.py --d_in=512 --num_latents=16384 --k=32 --batch=4096
  python benchmarks/architecture_step_cost.py --architectures=topk --decoder_norms=unit,free

Prints one JSON line: per architecture (and decoder norm, when several), the median wall and
process-CPU milliseconds of a step (perf.time_interleaved: the steps take turns, so other load
hits them alike).
"""

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax.kernels import perf
from sae_jax.training import step as step_lib
from sae_jax.config import SAEConfig


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--d_in", type=int, default=512)
  parser.add_argument("--num_latents", type=int, default=16384)
  parser.add_argument("--k", type=int, default=32)
  parser.add_argument("--batch", type=int, default=4096)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--architectures", default="topk,batchtopk,matryoshka-topk,"
                      "matryoshka-batchtopk")
  parser.add_argument("--decoder_norms", default="unit", help="comma list of --decoder_norm")
  args = parser.parse_args()
  n = args.num_latents
  prefixes = (n // 16, n // 4)
  architectures = {"topk": {}, "batchtopk": dict(architecture="batchtopk"),
                   "matryoshka-topk": dict(matryoshka_prefixes=prefixes),
                   "matryoshka-batchtopk": dict(architecture="batchtopk",
                                                matryoshka_prefixes=prefixes)}
  norms = args.decoder_norms.split(",")
  x = jnp.asarray(np.random.default_rng(0).normal(size=(args.batch, args.d_in)), jnp.float32)
  calls = {}
  for arch in args.architectures.split(","):
    for norm in norms:
      name = arch if len(norms) == 1 else f"{arch}/{norm}"
      cfg = SAEConfig(d_in=args.d_in, num_latents=n, k=args.k, threshold_start_step=0,
                      decoder_norm=norm, **architectures[arch])
      graphdef, state = step_lib.create_state(cfg, step_lib.make_optimizer(1e-4), seed=0)
      step = jax.jit(lambda state, x, graphdef=graphdef: step_lib.train_step(graphdef, state, x))
      calls[name] = lambda step=step, state=state: step(state, x)
  times = perf.time_interleaved(calls, steps=args.steps, warmup=1)
  print(json.dumps({"config": vars(args), "prefixes": prefixes, "devices": str(jax.devices()),
                    **{name: {"wall_ms": round(wall, 1), "cpu_ms": round(cpu, 1)}
                       for name, (wall, cpu) in times.items()}}))


if __name__ == "__main__":
  main()
