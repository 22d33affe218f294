"""Why BatchTopK recovers less than TopK on a hard planted dictionary (issue 20): one variant a run.

  python benchmarks/batchtopk_diagnosis.py --variant=topk
  python benchmarks/batchtopk_diagnosis.py --variant=batchtopk --data=varying
  python benchmarks/batchtopk_diagnosis.py --variant=dense_batchtopk   # plain JAX, jax.grad
  python benchmarks/batchtopk_diagnosis.py --variant=topk --dead_tokens=10240   # AuxK's window

The data: 1024 random unit directions in R^64 (16x more directions than dimensions), Zipf(1.0)
frequencies, log-normal(0, --magnitude_std = 0.5) magnitudes, a shared offset of 2 N(0, I) (norm
~16), noise 0.02.
`--data=fixed`: 4 distinct directions per row (Gumbel top-k by frequency); `--data=varying`: each
direction fires on its own with probability 4 x its Zipf share (4 per row on average). Each SAE:
n = 2048, k = 8, batches of 1024 fresh rows, `--steps` steps (3000: 3.1M tokens), Adam at the
default 2e-4 / sqrt(n / 2^14), b_dec at the geometric median of 4096 rows, no warmup. Prints one
JSON line: recovery (planted directions matched by a decoder row at cosine > 0.9; the rare half
alone), the last step's training FVU, held-out FVU and L0 as a user encodes (BatchTopK: the
JumpReLU, no cap), the fraction of latents never selected on 4096 held-out rows (the training
selection), and quantiles of the encoder row norms of latents selected and never selected.

Variants (see docs/benchmarks.md, "Why BatchTopK fell behind"): topk, batchtopk, and batchtopk with
one change each: tied_init (W_enc = W_dec, unit rows), dead_20k / dead_50k (AuxK's dead window in
tokens), auxk_1 (AuxK weight 1, dead after 100k tokens, as SAELens weighs it), cap_12 / cap_16
(--batchtopk_max_k), lr_2e-3 / lr_1.5e-4 (Adam's rate), b_dec_zero / b_dec_mean (b_dec's init),
b_dec_not_subtracted (the encoder reads x, not x - b_dec), normalize_inputs (one constant input
scale, as --normalize_inputs), group_64 / group_256 (the cut over each group of rows), relative (the
cut ranks each value divided by its token's |x - b_dec|), encoder_norm (divided by its latent's
encoder row norm), topk_then_batchtopk / topk_then_batchtopk_90 (TopK for the first half / 90% of
the steps), k_anneal_50 / k_anneal_90 (the cut's k falling from d_in to k over the first half / 90%
of the steps, as dictionary_learning's k_anneal_steps). Besides the held-out FVU as the run exports
(its JumpReLU), each prints that of two JumpReLUs calibrated on other rows (one threshold; one per
latent, matching each latent's count under the training selection). dense_topk / dense_batchtopk are
the plain dense method in a few lines of JAX; dense_planted_decoder_topk / _batchtopk the same with
the planted directions as a frozen decoder (the loss each cut reaches with the planted dictionary);
saelens_topk_median / saelens_batchtopk_median / saelens_batchtopk_zero are SAELens's SAETrainer on
the same batches (b_dec at the geometric median or at SAELens's zero). Trains nothing: oracle (the
planted directions as encoder and decoder, b_enc -0.5, the offset as b_dec; FVU of 4096 rows cut by
TopK, BatchTopK and BatchTopK over groups of rows, at k), data (what dominates the rows' norms).
"""

import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sae_jax.architectures import batchtopk
from sae_jax.config import SAEConfig
from sae_jax.kernels import topk as topk_lib
from sae_jax.model import SparseAutoencoder, geometric_median
from sae_jax.training import step as step_lib

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
    "topk_then_batchtopk_90": dict(architecture="batchtopk"),
    "encoder_norm": dict(architecture="batchtopk"),
    "group_64": dict(architecture="batchtopk"),
    "group_256": dict(architecture="batchtopk"),
    "b_dec_zero": dict(architecture="batchtopk"),
    "b_dec_mean": dict(architecture="batchtopk"),
    "b_dec_not_subtracted": dict(architecture="batchtopk"),
    "normalize_inputs": dict(architecture="batchtopk"),
    "k_anneal_50": dict(architecture="batchtopk", batchtopk_max_k=D),
    "k_anneal_90": dict(architecture="batchtopk", batchtopk_max_k=D),
    "saelens_topk_median": None,
    "saelens_batchtopk_median": None,
    "saelens_batchtopk_zero": None,
    "data": None,
    "dense_topk": None,
    "dense_batchtopk": None,
    "dense_planted_decoder_topk": None,
    "dense_planted_decoder_batchtopk": None,
    "oracle": None,
}


class Planted:
  def __init__(self, kind: str, seed: int = 0, magnitude_std: float = 0.5):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(M, D))
    self.directions = jnp.asarray(w / np.linalg.norm(w, axis=1, keepdims=True), jnp.float32)
    self.offset = jnp.asarray(2 * rng.normal(size=D), jnp.float32)
    share = (np.arange(M) + 1.0) ** -1.0
    share /= share.sum()
    self.log_share = jnp.log(jnp.asarray(share, jnp.float32))
    self.prob = jnp.asarray(np.minimum(4 * share, 1.0), jnp.float32)
    self.kind = kind
    self.magnitude_std = magnitude_std
    self.scale = 1.0  # normalize_inputs: the trainer's --normalize_inputs factor

  def batch(self, key, rows: int = ROWS) -> jax.Array:
    pick, mag, noise = jax.random.split(key, 3)
    if self.kind == "varying":
      on = jax.random.uniform(pick, (rows, M)) < self.prob
      x = (jnp.exp(self.magnitude_std * jax.random.normal(mag, (rows, M))) * on) @ self.directions
    else:
      _, picks = jax.lax.top_k(self.log_share + jax.random.gumbel(pick, (rows, M)), 4)
      coefs = jnp.exp(self.magnitude_std * jax.random.normal(mag, (rows, 4)))
      x = jnp.einsum("bj,bjd->bd", coefs, self.directions[picks])
    return self.scale * (x + self.offset + 0.02 * jax.random.normal(noise, x.shape))

  def recovery(self, W_dec) -> tuple[float, float]:
    W = np.asarray(W_dec, np.float64)
    found = (np.asarray(self.directions) @ (W / np.linalg.norm(W, axis=1, keepdims=True)).T
             ).max(1) > 0.9
    return float(found.mean()), float(found[M // 2:].mean())


def scaled_cut_losses(losses, divisor):
  """step.losses with BatchTopK's cut ranking each candidate value divided by
  divisor(model, x, candidate indices) (broadcast to [B, c]); the kept values stay unscaled."""
  def patched(model, x, dead):
    select, cut_select, seen = SparseAutoencoder.select, batchtopk.select, {}

    def recording_select(m, x, dead=None):
      picked = select(m, x, dead)
      seen["indices"] = picked[1]
      return picked

    def scaled_select(values, k):
      scaled = values / jax.lax.stop_gradient(divisor(model, x, seen["indices"]))
      kept = jnp.where(scaled >= batchtopk.kth_largest(scaled, values.shape[0] * k), values, 0.0)
      return kept, jnp.mean((kept[:, -1] > 0).astype(jnp.float32))

    SparseAutoencoder.select, batchtopk.select = recording_select, scaled_select
    try:
      return losses(model, x, dead)
    finally:
      SparseAutoencoder.select, batchtopk.select = select, cut_select
  return patched


# The step of the train_step being traced, for annealed_select (set by train_ours's loop).
TRACED_STEP = {}


def annealed_select(anneal_steps: int):
  """batchtopk.select with k annealed linearly from d_in down to k over the first anneal_steps
  steps (dictionary_learning's BatchTopKTrainer with k_anneal_steps); needs d_in candidates."""
  def select(values, k):
    ratio = jnp.minimum(TRACED_STEP.get("step", anneal_steps), anneal_steps) / anneal_steps
    count = values.shape[0] * (D * (1 - ratio) + k * ratio).astype(jnp.int32)
    kept = jnp.where(values >= batchtopk.kth_largest(values, count), values, 0.0)
    return kept, jnp.mean((kept[:, -1] > 0).astype(jnp.float32))
  return select


def token_norms(model, x, indices=None):
  """|x - b_dec| of each token, [B, 1]: the relative cut's divisor."""
  return jnp.linalg.norm(x.astype(jnp.float32) - model.b_dec[...], axis=1, keepdims=True)


def encoder_norms(model, x=None, indices=None):
  """|W_enc row| of each candidate's latent ([B, c]), or of every latent ([n]) without indices."""
  norms = jnp.linalg.norm(model.W_enc[...], axis=1)
  return norms if indices is None else norms[indices]


def grouped_select(rows: int):
  """batchtopk.select with the cut taken over each group of `rows` consecutive rows."""
  def select(values, k):
    groups = values.reshape(-1, rows, values.shape[1])
    cuts = jax.vmap(lambda g: batchtopk.kth_largest(g, rows * k))(groups)
    kept = jnp.where(groups >= cuts[:, None, None], groups, 0.0).reshape(values.shape)
    return kept, jnp.mean((kept[:, -1] > 0).astype(jnp.float32))
  return select


def encoder_without_b_dec():
  """Patches SparseAutoencoder so the encoder reads x itself, not x - b_dec (SAELens's
  apply_b_dec_to_input=False); b_dec stays the decoder's output bias."""
  select = SparseAutoencoder.select

  def patched_select(model, x, dead=None):
    b_dec = model.b_dec[...]
    model.b_dec[...] = jnp.zeros_like(b_dec)
    try:
      return select(model, x, dead)
    finally:
      model.b_dec[...] = b_dec

  SparseAutoencoder.select = patched_select
  SparseAutoencoder.pre_activations = lambda model, x: topk_lib.encoder_pre(
      x.astype(jnp.float32), model.W_enc[...], model.b_enc[...], jnp.float32)


def train_ours(data: Planted, cfg: SAEConfig, steps: int, first_step: int = 0, init=None,
               lr: float | None = None, b_dec_init: str = "median"):
  lr = lr or step_lib.default_learning_rate(N)
  sample = data.batch(jax.random.PRNGKey(10**6), 4096)
  b_dec = {"median": geometric_median, "mean": lambda s: s.mean(0),
           "zero": lambda s: jnp.zeros(D)}[b_dec_init](sample)
  graphdef, state = step_lib.create_state(cfg, step_lib.make_optimizer(lr), seed=0, b_dec=b_dec)
  if init is not None:
    model, optimizer = nnx.merge(graphdef, state)
    for name, value in init.items():
      getattr(model, name)[...] = value
    graphdef, state = nnx.split((model, optimizer))

  @jax.jit
  def loop(state):
    metrics = jax.eval_shape(lambda s: step_lib.train_step(graphdef, s, sample[:ROWS])[1], state)
    start = (state, jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype), metrics))
    def body(i, carry):
      TRACED_STEP["step"] = first_step + i
      return step_lib.train_step(graphdef, carry[0], data.batch(jax.random.PRNGKey(first_step + i)))
    return jax.lax.fori_loop(0, steps, body, start)

  state, metrics = loop(state)
  TRACED_STEP.pop("step", None)
  return graphdef, state, metrics


def measure_ours(data: Planted, variant: str, steps: int, decoder_norm: str,
                 dead_tokens: int | None = None) -> dict:
  window = {} if dead_tokens is None else {"dead_tokens": dead_tokens}
  cfg = SAEConfig(d_in=D, num_latents=N, k=K, decoder_norm=decoder_norm,
                  **{**VARIANTS[variant], **window})
  init = None
  if variant == "tied_init":
    model, _ = nnx.merge(*step_lib.create_state(cfg, optax.sgd(0), seed=0))
    init = {"W_enc": model.W_dec[...]}
  if variant == "relative":
    step_lib.losses = scaled_cut_losses(step_lib.losses, token_norms)
  if variant == "encoder_norm":
    step_lib.losses = scaled_cut_losses(step_lib.losses, encoder_norms)
  if variant.startswith("group_"):
    batchtopk.select = grouped_select(int(variant[6:]))
  if variant == "b_dec_not_subtracted":
    encoder_without_b_dec()
  if variant.startswith("k_anneal_"):  # the threshold is learned once k is reached
    anneal_steps = steps * int(variant[9:]) // 100
    batchtopk.select = annealed_select(anneal_steps)
    cfg = dataclasses.replace(cfg, threshold_start_step=anneal_steps)
  if variant.startswith("topk_then_batchtopk"):
    topk_steps = steps * 9 // 10 if variant.endswith("_90") else steps // 2
    graphdef, state, _ = train_ours(data, SAEConfig(d_in=D, num_latents=N, k=K,
                                                    decoder_norm=decoder_norm), topk_steps)
    model, _ = nnx.merge(graphdef, state)
    init = {n: getattr(model, n)[...] for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    cfg = SAEConfig(d_in=D, num_latents=N, k=K, architecture="batchtopk",
                    threshold_start_step=(steps - topk_steps) // 2, decoder_norm=decoder_norm)
    graphdef, state, metrics = train_ours(data, cfg, steps - topk_steps, topk_steps, init)
  else:
    lr = float(variant[3:]) if variant.startswith("lr_") else None
    b_dec_init = variant[6:] if variant in ("b_dec_zero", "b_dec_mean") else "median"
    graphdef, state, metrics = train_ours(data, cfg, steps, init=init, lr=lr,
                                          b_dec_init=b_dec_init)
  model, _ = nnx.merge(graphdef, state)
  held_out = data.batch(jax.random.PRNGKey(10**7), 4096)
  evaluated = step_lib.eval_metrics(graphdef, state, held_out)
  pre = model.pre_activations(held_out)
  if cfg.architecture == "batchtopk":
    selected = pre >= batchtopk.kth_largest(pre, len(pre) * K)
  else:
    selected = pre >= jax.lax.top_k(pre, K)[0][:, -1:]
  calibration = data.batch(jax.random.PRNGKey(10**7 + 1), 4096)
  calibrated = calibrated_jumprelus(
      model, held_out, calibration, training_selection(variant, model, calibration))
  return summary(data, np.asarray(model.W_dec[...]), np.asarray(model.W_enc[...]),
                 np.asarray(selected.any(0)), train_fvu=float(metrics["fvu"]),
                 heldout_fvu=float(evaluated["fvu"]), heldout_l0=float(evaluated["l0"]),
                 **calibrated)


def training_selection(variant: str, model: SparseAutoencoder, x) -> np.ndarray:
  """Which latents the variant's training selection keeps on the rows x, [B, n] bool."""
  pre = model.pre_activations(x)
  if model.cfg.architecture == "topk":
    return np.asarray(pre >= jax.lax.top_k(pre, K)[0][:, -1:])
  if variant == "relative":
    pre = pre / token_norms(model, x)
  if variant == "encoder_norm":
    pre = pre / encoder_norms(model)
  if variant.startswith("group_"):
    return np.asarray(grouped_select(int(variant[6:]))(pre, K)[0] > 0)
  return np.asarray(pre >= batchtopk.kth_largest(pre, len(pre) * K))


def calibrated_jumprelus(model: SparseAutoencoder, held_out, calibration, selected: np.ndarray) -> dict:
  """Held-out FVU / L0 of two JumpReLUs on absolute pre-activations, calibrated on other rows:
  one threshold for all latents (the calibration batch's B*k-th largest value), and one per
  latent (latent i keeps as many calibration rows as the training selection gave it)."""
  cal_pre = np.asarray(model.pre_activations(calibration))
  per_latent = np.sort(cal_pre, axis=0)[::-1]
  counts = selected.sum(0)
  thresholds = {
      "global": np.sort(cal_pre.ravel())[-len(cal_pre) * K],
      "per_latent": np.where(counts > 0, per_latent[np.maximum(counts - 1, 0), np.arange(N)],
                             np.inf)}
  x = np.asarray(held_out, np.float64)
  pre = np.asarray(model.pre_activations(held_out), np.float64)
  W_dec, b_dec = np.asarray(model.W_dec[...], np.float64), np.asarray(model.b_dec[...])
  out = {}
  for name, threshold in thresholds.items():
    code = np.where(pre >= threshold, pre, 0.0)
    fvu = ((x - code @ W_dec - b_dec) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    out[f"{name}_jumprelu_fvu_l0"] = [round(float(fvu), 4), round(float((code > 0).sum(1).mean()), 2)]
  return out


def measure_dense(data: Planted, architecture: str, steps: int, lr: float | None = None) -> dict:
  """The plain method: dense [B, n] codes, jax.grad, optax Adam, the same init and data. With
  architecture "planted_decoder_<cut>", the decoder is the planted directions themselves, frozen
  (n = 1024 latents, one per direction; the encoder starts as them, b_dec as the offset): the
  lowest loss that cut reaches with the planted dictionary, against what free training reaches."""
  planted = architecture.startswith("planted_decoder_")
  architecture = architecture.removeprefix("planted_decoder_")
  bound = 1 / np.sqrt(D)
  if planted:
    p = {"W_enc": data.directions, "b_enc": jnp.zeros(M), "W_dec": data.directions,
         "b_dec": data.offset}
  else:
    W_enc = jax.random.uniform(jax.random.PRNGKey(0), (N, D), jnp.float32, -bound, bound)
    p = {"W_enc": W_enc, "b_enc": jnp.zeros(N),
         "W_dec": W_enc / jnp.linalg.norm(W_enc, axis=1, keepdims=True),
         "b_dec": geometric_median(data.batch(jax.random.PRNGKey(10**6), 4096))}
  tx = optax.adam(lr or step_lib.default_learning_rate(N), eps=6.25e-10)

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
    if planted:
      g["W_dec"] = jnp.zeros_like(g["W_dec"])
    g["W_dec"] -= (g["W_dec"] * p["W_dec"]).sum(1, keepdims=True) * p["W_dec"]
    updates, opt = tx.update(g, opt, p)
    p = optax.apply_updates(p, updates)
    p["W_dec"] /= jnp.linalg.norm(p["W_dec"], axis=1, keepdims=True)
    return p, opt, loss

  p, _, loss = jax.jit(lambda p: jax.lax.fori_loop(0, steps, body, (p, tx.init(p), 0.0)))(p)
  held_out = data.batch(jax.random.PRNGKey(10**7), 4096)
  fired = code(p, held_out) > 0
  return summary(data, np.asarray(p["W_dec"]), np.asarray(p["W_enc"]), np.asarray(fired.any(0)),
                 train_fvu=float(loss), heldout_fvu=float(fvu(p, held_out)),
                 heldout_l0=float(fired.sum(1).mean()))


def measure_data(data: Planted) -> dict:
  """What dominates a row's norm: the shared offset, one large magnitude, a few loud rows."""
  rows = 8192
  pick, mag, _ = jax.random.split(jax.random.PRNGKey(10**7), 3)  # the coefficients of .batch
  if data.kind == "varying":
    coefs = np.asarray(jnp.exp(data.magnitude_std * jax.random.normal(mag, (rows, M)))
                       * (jax.random.uniform(pick, (rows, M)) < data.prob), np.float64)
  else:
    _, picks = jax.lax.top_k(data.log_share + jax.random.gumbel(pick, (rows, M)), 4)
    coefs = np.zeros((rows, M))
    np.put_along_axis(coefs, np.asarray(picks),
                      np.asarray(jnp.exp(data.magnitude_std * jax.random.normal(mag, (rows, 4)))),
                      1)
  x = np.asarray(data.batch(jax.random.PRNGKey(10**7), rows), np.float64)
  offset = np.asarray(data.offset, np.float64)
  energy = np.linalg.norm(x - offset, axis=1) ** 2
  top_share = coefs.max(1) ** 2 / np.maximum((coefs ** 2).sum(1), 1e-12)
  quantiles = lambda v: np.quantile(v, [0.1, 0.5, 0.9]).round(3).tolist()
  return {"row_norm_q10_50_90": quantiles(np.linalg.norm(x, axis=1)),
          "offset_share_of_squared_norm_q10_50_90": quantiles(
              offset @ offset / np.linalg.norm(x, axis=1) ** 2),
          "norm_without_offset_q10_50_90": quantiles(np.sqrt(energy)),
          "loudest_tenth_share_of_energy": float(np.sort(energy)[-rows // 10:].sum() / energy.sum()),
          "rows_with_one_magnitude_over_half": float((top_share[coefs.any(1)] > 0.5).mean()),
          "l0_q10_50_90": quantiles((coefs > 0).sum(1))}


def measure_oracle(data: Planted) -> dict:
  x = np.asarray(data.batch(jax.random.PRNGKey(10**7), 4096), np.float64)
  P, b_dec = np.asarray(data.directions, np.float64), np.asarray(data.offset, np.float64)
  pre = np.maximum((x - b_dec) @ P.T - 0.5, 0)
  fvu = lambda z: float(((x - z @ P - b_dec) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())

  def cut_per_group(rows: int) -> np.ndarray:  # rows=1: TopK; rows=len(x): BatchTopK
    groups = pre.reshape(-1, rows * pre.shape[1])
    cuts = -np.sort(-groups, axis=1)[:, rows * K - 1:rows * K]
    return np.where(groups >= cuts, groups, 0).reshape(pre.shape)

  return {"topk_fvu": fvu(cut_per_group(1)), "batchtopk_fvu": fvu(cut_per_group(len(x))),
          **{f"groups_of_{rows}_fvu": fvu(cut_per_group(rows)) for rows in (16, 64, 256)}}


def measure_saelens(data: Planted, architecture: str, steps: int, b_dec_init: str,
                    dead_tokens: int | None = None) -> dict:
  """SAELens 6.54's SAETrainer and its own training SAE on the same batches in the same order, at
  our default lr, with b_dec at the geometric median of the same 4096 rows ("median") or at its
  own zero ("zero"), its dead window `dead_tokens` (default: its own 1,000 steps); held-out
  numbers from its saved inference model (BatchTopK: its JumpReLU)."""
  import tempfile

  import torch
  from sae_lens import (SAE, BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, LoggingConfig,
                        SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig)
  from sae_lens.config import SAETrainerConfig

  torch.manual_seed(0)
  common = dict(d_in=D, d_sae=N, k=K, device="cpu")
  sae = (BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**common)) if architecture == "batchtopk"
         else TopKTrainingSAE(TopKTrainingSAEConfig(**common)))
  if b_dec_init == "median":
    with torch.no_grad():
      sae.b_dec.copy_(torch.from_numpy(np.array(
          geometric_median(data.batch(jax.random.PRNGKey(10**6), 4096)))))
  batch = jax.jit(data.batch)
  provider = (torch.from_numpy(np.array(batch(jax.random.PRNGKey(i)))) for i in range(steps))
  lr = step_lib.default_learning_rate(N)
  cfg = SAETrainerConfig(
      total_training_samples=steps * ROWS, train_batch_size_samples=ROWS, lr=lr, lr_end=lr,
      lr_scheduler_name="constant", lr_warm_up_steps=0, device="cpu", n_checkpoints=0,
      save_final_checkpoint=False,
      logger=LoggingConfig(log_to_wandb=False, eval_every_n_wandb_logs=2 ** 31 - 1),
      **({} if dead_tokens is None else {"dead_feature_window": max(1, dead_tokens // ROWS)}))
  trained = SAETrainer(cfg=cfg, sae=sae, data_provider=provider).fit()
  with tempfile.TemporaryDirectory() as folder:
    trained.save_inference_model(folder)
    inference = SAE.load_from_disk(folder, device="cpu")
  x = torch.from_numpy(np.array(data.batch(jax.random.PRNGKey(10**7), 4096)))
  with torch.no_grad():
    code, x_hat = inference.encode(x), inference(x)
  fvu = float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
  W_dec = inference.W_dec.detach().numpy()
  return summary(data, W_dec, inference.W_enc.detach().numpy().T,
                 (code > 0).any(0).numpy(), heldout_fvu=fvu,
                 heldout_l0=float((code > 0).sum(1).float().mean()))


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
  parser.add_argument("--lr", type=float, default=None,
                      help="dense_* variants: Adam's rate (default: the trainer's default)")
  parser.add_argument("--magnitude_std", type=float, default=0.5,
                      help="sigma of the log-normal magnitudes (0: every magnitude is 1)")
  parser.add_argument("--decoder_norm", choices=("unit", "free"), default="free",
                      help="our trainer's variants (docs/benchmarks.md's table: unit)")
  parser.add_argument("--dead_tokens", type=int, default=None,
                      help="AuxK's dead window in tokens of our trainer's variants (default: "
                      "the variant's, else the trainer's 10M) and SAELens's (default: its 1,000 "
                      "steps)")
  args = parser.parse_args()
  if (args.dead_tokens is not None and VARIANTS[args.variant] is None
      and not args.variant.startswith("saelens_")):
    parser.error(f"--dead_tokens sets a trainer's window: --variant={args.variant} trains no SAE")
  data = Planted(args.data, magnitude_std=args.magnitude_std)
  if args.variant == "normalize_inputs":  # mean squared norm d_in, as --normalize_inputs scales
    data.scale = float(jnp.sqrt(D / jnp.mean(jnp.sum(data.batch(jax.random.PRNGKey(10**6),
                                                                  4096) ** 2, axis=1))))
  start = time.perf_counter()
  if args.variant == "oracle":
    result = measure_oracle(data)
  elif args.variant == "data":
    result = measure_data(data)
  elif args.variant.startswith("saelens_"):
    _, architecture, b_dec_init = args.variant.split("_")
    result = measure_saelens(data, architecture, args.steps, b_dec_init, args.dead_tokens)
  elif args.variant.startswith("dense_"):
    result = measure_dense(data, args.variant.removeprefix("dense_"), args.steps, args.lr)
  else:
    result = measure_ours(data, args.variant, args.steps, args.decoder_norm, args.dead_tokens)
  print(json.dumps({"variant": args.variant, "data": args.data, "steps": args.steps,
                    "magnitude_std": args.magnitude_std, "lr": args.lr,
                    "decoder_norm": args.decoder_norm, "dead_tokens": args.dead_tokens, **result,
                    "seconds": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
  main()
