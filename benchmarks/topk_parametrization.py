"""Why SAELens's TopK leads ours after one pass of scaled SynthSAEBench: a plain-JAX TopK (dense
codes, jax.grad, optax Adam) trained on the batches of one of synthbench.py's runs, in its order,
with SAELens's choices switched on one at a time, each scored by `eval.synthetic score`.

  python benchmarks/synthbench.py --workdir=/tmp/synthbench --architectures=topk --lrs=5e-3
  python benchmarks/topk_parametrization.py --workdir=/tmp/synthbench --lr=5e-3

Variants (name: decoder, init, loss and Adam eps, b_dec, gradient clip):
  ours:               unit decoder rows (gradient projected, renormalised after each step), our
                      init (W_enc uniform +-1/sqrt(d), W_dec its unit rows), FVU and eps 6.25e-10,
                      b_dec the geometric median, no clip: what sae_jax.train does
  saelens_init:       unit rows, SAELens's init (kaiming-uniform W_dec rows at norm 0.1, W_enc =
                      W_dec^T), its loss (squared error summed over dims, mean over the batch) and
                      eps 1e-8, b_dec the mean
  saelens_init_clip:  the same and SAELens's global gradient-norm clip at 1
  free:               free decoder norms, the top k ranked by pre-activation x decoder norm and
                      decoded by the unit rows (SAELens's rescale_acts_by_decoder_norm), our init
                      (W_dec starts as W_enc itself, rows of norm ~0.58), loss, eps and b_dec
  free_saelens_init:  free norms with SAELens's init, loss, eps and b_dec
  saelens:            free norms, SAELens's init, loss, eps, b_dec and clip: its TopK trainer
  free_b2_0.98:       free norms with Adam's beta2 at 0.98 (0.999 in all the others)
  free_rising_b2:     free norms with beta2 rising as 1 - t^-0.8 (Adafactor's; 0.98 at step
                      130, 0.996 at step 1024), without bias correction of the second moment
Prints one JSON line per variant (F1, MCC, dead latents) and appends it to
WORKDIR/parametrization/results.jsonl (a rerun skips the variants scored there); free norms are
folded into the exported dictionary (the same function with unit rows).
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from synthbench import our_batches  # noqa: E402
from sae_jax.formats import dictionary  # noqa: E402
from sae_jax.model import geometric_median  # noqa: E402

VARIANTS = {  # name: (free decoder norms, SAELens's init/loss/eps/b_dec, gradient clip, beta2)
    "ours": (False, False, 0.0, 0.999),
    "saelens_init": (False, True, 0.0, 0.999),
    "saelens_init_clip": (False, True, 1.0, 0.999),
    "free": (True, False, 0.0, 0.999),
    "free_saelens_init": (True, True, 0.0, 0.999),
    "saelens": (True, True, 1.0, 0.999),
    "free_b2_0.98": (True, False, 0.0, 0.98),
    "free_rising_b2": (True, False, 0.0, "rising"),
}


def adam_rising_b2(learning_rate: optax.Schedule, eps: float, b1: float = 0.9,
                   decay: float = 0.8) -> optax.GradientTransformation:
  """Adam whose beta2 at step t (from 1) is 1 - t^-decay, as Adafactor's: the second moment
  averages all steps so far with a memory that grows, so needs no bias correction."""
  def init(params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    return zeros, zeros, jnp.zeros((), jnp.int32)

  def update(grads, state, params=None):
    m, v, count = state
    t = (count + 1).astype(jnp.float32)
    b2 = 1 - t ** -decay
    m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, m, grads)
    v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, v, grads)
    lr = learning_rate(count)
    updates = jax.tree.map(lambda m, v: -lr * m / (1 - b1 ** t) / (jnp.sqrt(v) + eps), m, v)
    return updates, (m, v, count + 1)

  return optax.GradientTransformation(init, update)


def train(batches, *, steps: int, k: int, num_latents: int, lr: float, warmup: int, free: bool,
          saelens: bool, clip: float, b2: float | str) -> dict:
  """The dictionary trained on `steps` batches of `batches()` (a fresh iterator of the run's
  batches, in its order), with unit decoder rows."""
  rows = batches()
  sample = np.concatenate([np.asarray(next(rows), np.float32) for _ in range(16)])[:16384]
  d = sample.shape[1]
  key = jax.random.PRNGKey(0)
  if saelens:
    bound = np.sqrt(6 / d)
    W_dec = jax.random.uniform(key, (num_latents, d), jnp.float32, -bound, bound)
    W_dec = 0.1 * W_dec / jnp.linalg.norm(W_dec, axis=1, keepdims=True)
    W_enc = W_dec
    b_dec = jnp.asarray(sample.mean(0))
  else:
    bound = 1 / np.sqrt(d)
    W_enc = jax.random.uniform(key, (num_latents, d), jnp.float32, -bound, bound)
    W_dec = W_enc
    b_dec = geometric_median(jnp.asarray(sample))
  if not free:
    W_dec = W_dec / jnp.linalg.norm(W_dec, axis=1, keepdims=True)
  params = {"W_enc": W_enc, "b_enc": jnp.zeros(num_latents), "W_dec": W_dec, "b_dec": b_dec}
  schedule = optax.join_schedules([optax.linear_schedule(0, lr, warmup),
                                   optax.constant_schedule(lr)], [warmup])
  eps = 1e-8 if saelens else 6.25e-10
  tx = (adam_rising_b2(schedule, eps) if b2 == "rising" else optax.adam(schedule, b2=b2, eps=eps))
  if clip:
    tx = optax.chain(optax.clip_by_global_norm(clip), tx)

  def reconstruct(p, x):
    norms = jnp.linalg.norm(p["W_dec"], axis=1)
    pre = (x - p["b_dec"]) @ p["W_enc"].T + p["b_enc"]
    pre = pre * norms if free else pre
    values, indices = jax.lax.top_k(pre, k)
    code = jnp.zeros_like(pre).at[jnp.arange(len(x))[:, None], indices].set(jax.nn.relu(values))
    return code @ (p["W_dec"] / norms[:, None]) + p["b_dec"]

  def loss(p, x):
    error = jnp.sum((x - reconstruct(p, x)) ** 2)
    return error / len(x) if saelens else error / jnp.sum((x - x.mean(0)) ** 2)

  @jax.jit
  def step(p, opt, x):
    g = jax.grad(loss)(p, x)
    if not free:  # the gradient along each unit row would only change its norm
      g["W_dec"] -= (g["W_dec"] * p["W_dec"]).sum(1, keepdims=True) * p["W_dec"]
    updates, opt = tx.update(g, opt, p)
    p = optax.apply_updates(p, updates)
    if not free:
      p["W_dec"] /= jnp.linalg.norm(p["W_dec"], axis=1, keepdims=True)
    return p, opt

  p, opt, rows = params, tx.init(params), batches()
  for _ in tqdm(range(steps), unit="step", leave=False):
    p, opt = step(p, opt, jnp.asarray(next(rows), jnp.float32))
  # Norms are 1 unless free: folded into the encoder either way.
  return dictionary.fold_decoder_norms({name: np.asarray(v) for name, v in p.items()})


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", type=Path, required=True, help="synthbench.py's workdir")
  parser.add_argument("--run", default="ours-topk-0.005", help="the run whose batches to use")
  parser.add_argument("--lr", type=float, default=5e-3)
  parser.add_argument("--variants", default=",".join(VARIANTS))
  args = parser.parse_args()
  flags = json.loads((args.workdir / args.run / "flags.json").read_text())
  out_dir = args.workdir / "parametrization"
  results = out_dir / "results.jsonl"
  done = {(r["run"], r["variant"], r["lr"]) for r in map(
      json.loads, results.read_text().splitlines() if results.exists() else [])}
  for name in args.variants.split(","):
    if (args.run, name, args.lr) in done:  # a rerun goes on after the last scored variant
      continue
    free, saelens, clip, b2 = VARIANTS[name]
    params = train(lambda: our_batches(args.workdir / args.run), steps=flags["steps"],
                   k=flags["k"], num_latents=flags["num_latents"], lr=args.lr,
                   warmup=flags["lr_warmup_steps"], free=free, saelens=saelens, clip=clip,
                   b2=b2)
    out = dictionary.write(out_dir / f"{args.run}-{name}-{args.lr:g}", "topk", params,
                           k=flags["k"], layout="saelens")
    scored = subprocess.run([sys.executable, "-m", "eval.synthetic", "score", f"--sae={out}",
                             f"--store={args.workdir / 'store'}", "--samples=16384", "--seed=0"],
                            capture_output=True, text=True, cwd=ROOT, check=True)
    result = json.loads(scored.stdout.splitlines()[-1])
    row = {"run": args.run, "variant": name, "lr": args.lr, "f1": round(result["f1"], 3),
           "mcc": round(result["mcc"], 3), "dead": result["dead_latents"]}
    with results.open("a") as f:
      f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
