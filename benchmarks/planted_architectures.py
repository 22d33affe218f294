"""TopK, BatchTopK and their Matryoshka versions on one planted dictionary, at one token budget.

  python benchmarks/planted_architectures.py --steps=3000 --seeds=0,1,2 [--decoder_norm=unit]

The data (tests/planted.py): 64 unit directions in R^32 fire at Zipf frequencies (the rarest
1/64th as often as the most frequent), 3 per row with coefficients in [0.5, 1.5], plus noise of
std 0.01. Each SAE has 128 latents, k = 4, and sees `--steps` batches of 256 fresh rows. Prints one
JSON line per architecture, averaged over the seeds: the share of the 32 most frequent and of the
16 rarest planted features that some decoder row matches (cosine > 0.9), the FVU and L0 on 4,096
held-out rows as a user encodes them (BatchTopK: the JumpReLU at the learned threshold), the last
step's training FVU and dead fraction, and where the 16 most frequent features live (the median
index of their closest latents: Matryoshka should put them in its first prefix).
"""

import argparse
import json
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import planted  # noqa: E402

from sae_jax.training import step as step_lib# noqa: E402
from sae_jax.model import SAEConfig  # noqa: E402

D, M, N, K, ACTIVE, NOISE, ROWS, LR = 32, 64, 128, 4, 3, 0.01, 256, 3e-3
ARCHITECTURES = {
    "topk": dict(),
    "batchtopk": dict(architecture="batchtopk"),
    "matryoshka-topk": dict(matryoshka_prefixes=(16, 64)),
    "matryoshka-batchtopk": dict(architecture="batchtopk", matryoshka_prefixes=(16, 64)),
}


def config(name: str, steps: int, decoder_norm: str) -> SAEConfig:
  return SAEConfig(d_in=D, num_latents=N, k=K, dead_tokens=50 * ROWS,
                   threshold_start_step=steps // 4, decoder_norm=decoder_norm,
                   **ARCHITECTURES[name])


def measure(name: str, steps: int, seed: int, decoder_norm: str) -> dict:
  """One SAE trained on the planted data (data and init from `seed`), scored."""
  directions = planted.directions(M, D, seed)
  freq = planted.frequencies(M, 1.0)
  graphdef, state, metrics = planted.train(config(name, steps, decoder_norm), directions, freq,
                                           steps=steps, rows=ROWS, active=ACTIVE, noise=NOISE,
                                           lr=LR, seed=seed)
  found = planted.recovery(graphdef, state, directions)
  held_out = planted.batch(jax.random.PRNGKey(10**7 + seed), directions, np.log(freq), 4096,
                           ACTIVE, NOISE)
  evaluated = step_lib.eval_metrics(graphdef, state, held_out)
  return {"frequent_recovered": found[:M // 2].mean(), "rare_recovered": found[-M // 4:].mean(),
          "fvu": float(evaluated["fvu"]), "l0": float(evaluated["l0"]),
          "train_fvu": float(metrics["fvu"]), "dead_fraction": float(metrics["dead_fraction"]),
          "frequent_latent_median": float(np.median(
              planted.best_latent(graphdef, state, directions)[:16]))}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=3000)
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--architectures", default=",".join(ARCHITECTURES))
  parser.add_argument("--decoder_norm", default="free", choices=["unit", "free"])
  args = parser.parse_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  for name in args.architectures.split(","):
    runs = [measure(name, args.steps, seed, args.decoder_norm) for seed in seeds]
    print(json.dumps({"architecture": name, "decoder_norm": args.decoder_norm,
                      "steps": args.steps, "tokens": args.steps * ROWS,
                      "seeds": seeds, **{key: round(float(np.mean([r[key] for r in runs])), 4)
                                         for key in runs[0]}}), flush=True)


if __name__ == "__main__":
  main()
