"""Why BatchTopK recovers less than TopK on a hard planted dictionary (issue 20): one variant a run.

  python benchmarks/batchtopk_diagnosis.py --variant=topk
  python benchmarks/batchtopk_diagnosis.py --variant=batchtopk --data=varying
  python benchmarks/batchtopk_diagnosis.py --variant=dense_batchtopk   # plain JAX, jax.grad

The data: 1024 random unit directions in R^64 (16x more directions than dimensions), Zipf(1.0)
frequencies, log-normal(0, 0.5) magnitudes, a shared offset of 2 N(0, I) (norm ~16), noise 0.02.
`--data=fixed`: 4 distinct directions per row (Gumbel top-k by frequency); `--data=varying`: each
direction fires on its own with probability 4 x its Zipf share (4 per row on average). Each SAE:
n = 2048, k = 8, batches of 1024 fresh rows, `--steps` steps (3000: 3.1M tokens), Adam at the
default 2e-4 / sqrt(n / 2^14), b_dec at the geometric median of 4096 rows, no warmup. Prints one
JSON line: recovery (planted directions matched by a decoder row at cosine > 0.9; the rare half
alone), the last step's training FVU, held-out FVU and L0 as a user encodes (BatchTopK: the
JumpReLU, no cap), the fraction of latents never selected on 4096 held-out rows (the training
selection), and quantiles of the encoder row norms of latents selected and never selected.

Variants (see docs/benchmarks.md, "Why BatchTopK fell behind"): topk, batchtopk, and batchtopk
with one change each: tied_init (W_enc = W_dec, unit rows), dead_20k / dead_50k (AuxK's dead
window in tokens), auxk_1 (AuxK weight 1, dead after 100k tokens, as SAELens weighs it), cap_12 /
cap_16 (--batchtopk_max_k), lr_2e-3 / lr_1.5e-4 (Adam's rate), relative (the batch cut ranks each value divided by its token's
|x - b_dec|, so loud tokens no longer win the budget), topk_then_batchtopk (TopK for the first
half); dense_topk / dense_batchtopk are the plain dense method in a few lines of JAX; oracle
trains nothing: the planted directions as encoder and decoder (b_enc -0.5, the offset as b_dec),
FVU of 4096 rows selected by TopK and by BatchTopK at k.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sae_jax.architectures import batchtopk, step as step_lib
from sae_jax.config import SAEConfig
from sae_jax.model import geometric_median

D, M, N, K, ROWS = 64, 1024, 2048, 8, 1024
VARIANTS = {
    "topk": dict(architecture="topk"),
    "batchtopk": dict(architecture="batchtopk"),
    "tied_init": dict(architecture="batchtopk"),
    "dead_20k": dict(architecture="batchtopk", dead_tokens=20_000),
    "dead_50k": dict(architecture="batchtopk", dead_tokens=50_000),
    "auxk_1": dict(architecture="batchtopk", auxk_alpha=1.0, dead_tokens=100_000),
    "cap_12": dict(architecture="batchtopk", batchtopk_max_k=12, threshold_start_step=500),
    "cap_16": dict(architecture="batchtopk", batchtopk_max_k=16, threshold_start_step=500),
    "relative": dict(architecture="batchtopk"),
    "lr_2e-3": dict(architecture="batchtopk"),
    "lr_1.5e-4": dict(architecture="batchtopk"),
    "topk_then_batchtopk": dict(architecture="batchtopk"),
    "dense_topk": None,
    "dense_batchtopk": None,
    "oracle": None,
}


class Planted:
  def __init__(self, kind: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(M, D))
    self.directions = jnp.asarray(w / np.linalg.norm(w, axis=1, keepdims=True), jnp.float32)
    self.offset = jnp.asarray(2 * rng.normal(size=D), jnp.float32)
    share = (np.arange(M) + 1.0) ** -1.0
    share /= share.sum()
    self.log_share = jnp.log(jnp.asarray(share, jnp.float32))
    self.prob = jnp.asarray(np.minimum(4 * share, 1.0), jnp.float32)
    self.kind = kind

  def batch(self, key, rows: int = ROWS) -> jax.Array:
    pick, mag, noise = jax.random.split(key, 3)
    if self.kind == "varying":
      on = jax.random.uniform(pick, (rows, M)) < self.prob
      x = (jnp.exp(0.5 * jax.random.normal(mag, (rows, M))) * on) @ self.directions
    else:
      _, picks = jax.lax.top_k(self.log_share + jax.random.gumbel(pick, (rows, M)), 4)
      coefs = jnp.exp(0.5 * jax.random.normal(mag, (rows, 4)))
      x = jnp.einsum("bj,bjd->bd", coefs, self.directions[picks])
    return x + self.offset + 0.02 * jax.random.normal(noise, x.shape)

  def recovery(self, W_dec) -> tuple[float, float]:
    W = np.asarray(W_dec, np.float64)
    found = (np.asarray(self.directions) @ (W / np.linalg.norm(W, axis=1, keepdims=True)).T
             ).max(1) > 0.9
    return float(found.mean()), float(found[M // 2:].mean())


def relative_losses(losses):
  """step.losses with BatchTopK's cut taken over value / |x - b_dec| of the value's token."""
  def patched(model, x, dead):
    norms = jnp.linalg.norm(x.astype(jnp.float32) - model.b_dec[...], axis=1, keepdims=True)
    select = batchtopk.select

    def relative_select(values, k):
      scaled = values / norms
      kept = jnp.where(scaled >= batchtopk.kth_largest(scaled, values.shape[0] * k), values, 0.0)
      return kept, jnp.mean((kept[:, -1] > 0).astype(jnp.float32))

    batchtopk.select = relative_select
    try:
      return losses(model, x, dead)
    finally:
      batchtopk.select = select
  return patched


def train_ours(data: Planted, cfg: SAEConfig, steps: int, first_step: int = 0, init=None,
               lr: float | None = None):
  lr = lr or step_lib.default_learning_rate(N)
  sample = data.batch(jax.random.PRNGKey(10**6), 4096)
  graphdef, state = step_lib.create_state(cfg, step_lib.make_optimizer(lr), seed=0,
                                          b_dec=geometric_median(sample))
  if init is not None:
    model, optimizer = nnx.merge(graphdef, state)
    for name, value in init.items():
      getattr(model, name)[...] = value
    graphdef, state = nnx.split((model, optimizer))

  @jax.jit
  def loop(state):
    metrics = jax.eval_shape(lambda s: step_lib.train_step(graphdef, s, sample[:ROWS])[1], state)
    start = (state, jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype), metrics))
    return jax.lax.fori_loop(0, steps, lambda i, c: step_lib.train_step(
        graphdef, c[0], data.batch(jax.random.PRNGKey(first_step + i))), start)

  state, metrics = loop(state)
  return graphdef, state, metrics


def measure_ours(data: Planted, variant: str, steps: int) -> dict:
  cfg = SAEConfig(d_in=D, num_latents=N, k=K, **VARIANTS[variant])
  init = None
  if variant == "tied_init":
    model, _ = nnx.merge(*step_lib.create_state(cfg, optax.sgd(0), seed=0))
    init = {"W_enc": model.W_dec[...]}
  if variant == "relative":
    step_lib.losses = relative_losses(step_lib.losses)
  if variant == "topk_then_batchtopk":
    graphdef, state, _ = train_ours(data, SAEConfig(d_in=D, num_latents=N, k=K), steps // 2)
    model, _ = nnx.merge(graphdef, state)
    init = {n: getattr(model, n)[...] for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    cfg = SAEConfig(d_in=D, num_latents=N, k=K, architecture="batchtopk",
                    threshold_start_step=steps // 4)
    graphdef, state, metrics = train_ours(data, cfg, steps - steps // 2, steps // 2, init)
  else:
    lr = float(variant[3:]) if variant.startswith("lr_") else None
    graphdef, state, metrics = train_ours(data, cfg, steps, init=init, lr=lr)
  model, _ = nnx.merge(graphdef, state)
  held_out = data.batch(jax.random.PRNGKey(10**7), 4096)
  evaluated = step_lib.eval_metrics(graphdef, state, held_out)
  pre = model.pre_activations(held_out)
  if cfg.architecture == "batchtopk":
    selected = pre >= batchtopk.kth_largest(pre, len(pre) * K)
  else:
    selected = pre >= jax.lax.top_k(pre, K)[0][:, -1:]
  return summary(data, np.asarray(model.W_dec[...]), np.asarray(model.W_enc[...]),
                 np.asarray(selected.any(0)), train_fvu=float(metrics["fvu"]),
                 heldout_fvu=float(evaluated["fvu"]), heldout_l0=float(evaluated["l0"]))


def measure_dense(data: Planted, architecture: str, steps: int) -> dict:
  """The plain method: dense [B, n] codes, jax.grad, optax Adam, the same init and data."""
  bound = 1 / np.sqrt(D)
  W_enc = jax.random.uniform(jax.random.PRNGKey(0), (N, D), jnp.float32, -bound, bound)
  p = {"W_enc": W_enc, "b_enc": jnp.zeros(N),
       "W_dec": W_enc / jnp.linalg.norm(W_enc, axis=1, keepdims=True),
       "b_dec": geometric_median(data.batch(jax.random.PRNGKey(10**6), 4096))}
  tx = optax.adam(step_lib.default_learning_rate(N), eps=6.25e-10)

  def code(p, x):
    pre = jax.nn.relu((x - p["b_dec"]) @ p["W_enc"].T + p["b_enc"])
    if architecture == "topk":
      return jnp.where(pre >= jax.lax.top_k(pre, K)[0][:, -1:], pre, 0.0)
    return jnp.where(pre >= batchtopk.kth_largest(pre, len(x) * K), pre, 0.0)

  def fvu(p, x):
    x_hat = code(p, x) @ p["W_dec"] + p["b_dec"]
    return jnp.sum((x - x_hat) ** 2) / jnp.sum((x - x.mean(0)) ** 2)

  def body(i, carry):
    p, opt, _ = carry
    loss, g = jax.value_and_grad(fvu)(p, data.batch(jax.random.PRNGKey(i)))
    g["W_dec"] -= (g["W_dec"] * p["W_dec"]).sum(1, keepdims=True) * p["W_dec"]
    updates, opt = tx.update(g, opt, p)
    p = optax.apply_updates(p, updates)
    p["W_dec"] /= jnp.linalg.norm(p["W_dec"], axis=1, keepdims=True)
    return p, opt, loss

  p, _, loss = jax.jit(lambda p: jax.lax.fori_loop(0, steps, body, (p, tx.init(p), 0.0)))(p)
  held_out = data.batch(jax.random.PRNGKey(10**7), 4096)
  return summary(data, np.asarray(p["W_dec"]), np.asarray(p["W_enc"]),
                 np.asarray((code(p, held_out) > 0).any(0)), train_fvu=float(loss),
                 heldout_fvu=float(fvu(p, held_out)))


def measure_oracle(data: Planted) -> dict:
  x = np.asarray(data.batch(jax.random.PRNGKey(10**7), 4096), np.float64)
  P, b_dec = np.asarray(data.directions, np.float64), np.asarray(data.offset, np.float64)
  pre = np.maximum((x - b_dec) @ P.T - 0.5, 0)
  per_token = np.where(pre >= -np.sort(-pre, axis=1)[:, K - 1:K], pre, 0)
  batch = np.where(pre >= np.sort(pre.ravel())[-len(x) * K], pre, 0)
  fvu = lambda z: float(((x - z @ P - b_dec) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
  return {"topk_fvu": fvu(per_token), "batchtopk_fvu": fvu(batch)}


def summary(data, W_dec, W_enc, ever_selected, **numbers) -> dict:
  recovered, rare = data.recovery(W_dec)
  norms = np.linalg.norm(W_enc, axis=1)
  quantiles = lambda v: np.quantile(v, [0.1, 0.5, 0.9]).round(3).tolist() if len(v) else None
  return {"recovered": recovered, "rare_half_recovered": rare, **numbers,
          "never_selected": float(1 - ever_selected.mean()),
          "encoder_norm_selected": quantiles(norms[ever_selected]),
          "encoder_norm_never": quantiles(norms[~ever_selected])}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variant", choices=sorted(VARIANTS), required=True)
  parser.add_argument("--data", choices=("fixed", "varying"), default="fixed")
  parser.add_argument("--steps", type=int, default=3000)
  args = parser.parse_args()
  data = Planted(args.data)
  start = time.perf_counter()
  if args.variant == "oracle":
    result = measure_oracle(data)
  elif args.variant.startswith("dense_"):
    result = measure_dense(data, args.variant.removeprefix("dense_"), args.steps)
  else:
    result = measure_ours(data, args.variant, args.steps)
  print(json.dumps({"variant": args.variant, "data": args.data, "steps": args.steps, **result,
                    "seconds": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
  main()
