"""Fingerprints of the optimized HLO of the training step and the inference metrics, per
architecture, so that a refactor can show it left the programs unchanged.

  python benchmarks/hlo_fingerprint.py [--out=DIR]

prints one JSON line {config: sha256 of the program text} for TopK (free decoder norms, the
default, and unit rows), Multi-TopK, BatchTopK and Matryoshka on each (d_in 64, 1024 latents,
k 8, batch 256, this machine's kernel plan). The text is XLA's optimized module with the source
locations removed (file and line numbers change when code moves; the program does not). Compare
fingerprints from the same jax version and machine; --out also writes the texts, for a diff.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp

from sae_jax.config import SAEConfig
from sae_jax.kernels.kernel_plan import KernelPlan
from sae_jax.training import step

CONFIGS = {
    "topk": {},
    "topk_unit_rows": {"decoder_norm": "unit"},
    "topk_multi": {"multi_topk": True},
    "batchtopk": {"architecture": "batchtopk"},
    "matryoshka_topk": {"matryoshka_prefixes": (64, 256)},
    "matryoshka_batchtopk": {"architecture": "batchtopk", "matryoshka_prefixes": (64, 256)},
}


def program_text(compiled) -> str:
  """The optimized module without its source-location tables and references to them."""
  text = compiled.as_text()
  start, stack = text.find("\nFileNames"), text.find("\nStackFrames")
  if start >= 0:
    text = text[:start] + text[text.find("\n\n", stack):]
  text = re.sub(r",?\s*stack_frame_id=\d+", "", text)
  text = re.sub(r"metadata=\{[^}]*\}", "", text)
  return re.sub(r"^HloModule \S+", "HloModule m", text)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", help="Also write each program's text into this folder.")
  args = parser.parse_args()
  plan = KernelPlan.for_devices(jax.devices())
  x = jnp.ones((256, 64), jnp.float32)
  fingerprints = {}
  for name, overrides in CONFIGS.items():
    cfg = SAEConfig(d_in=64, num_latents=1024, k=8, **overrides)
    graphdef, state = step.create_state(cfg, step.make_optimizer(1e-3), seed=0, plan=plan)
    for program, fn in (("step", step.train_step), ("eval", step.eval_metrics)):
      text = program_text(jax.jit(fn, static_argnums=0).lower(graphdef, state, x).compile())
      fingerprints[f"{name}.{program}"] = hashlib.sha256(text.encode()).hexdigest()[:16]
      if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"{name}.{program}.hlo").write_text(text)
  print(json.dumps({"jax": jax.__version__, "kernel_plan": plan.to_json(), **fingerprints}))


if __name__ == "__main__":
  main()
