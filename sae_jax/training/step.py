"""The pure training step: losses, sparse gradients, decoder-parallel projection, Adam, renorm
(the last two only with unit decoder rows).

State is `nnx.split((model, optimizer))`, so a step is a pure function of (graphdef, state, batch)
that the trainer jits with `donate_argnums=1` and any shardings it likes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sae_jax.kernels import sharded
from sae_jax.architectures import matryoshka
from sae_jax.config import SAEConfig
from sae_jax.kernels.kernel_plan import KernelPlan
from sae_jax.model import SparseAutoencoder, kernels, row_dots


def default_learning_rate(num_latents: int) -> float:
  """Adam LR scaled as 1/sqrt(width) (Gao et al., as sparsify uses it)."""
  return 2e-4 / np.sqrt(num_latents / 2**14)


def make_optimizer(learning_rate: float | optax.Schedule, *, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 6.25e-10, grad_clip: float | None = None
                   ) -> optax.GradientTransformation:
  """Adam with OpenAI's small eps, optionally after global-norm clipping."""
  adam = optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)
  return optax.chain(optax.clip_by_global_norm(grad_clip), adam) if grad_clip else adam


def lr_schedule(peak: float, warmup: int, total: int, decay: str) -> optax.Schedule:
  """A linear warmup to `peak`, then constant or a decay that reaches 0 at step `total`."""
  warmup = min(warmup, total)
  after = {
      "constant": optax.constant_schedule(peak),
      "linear": optax.linear_schedule(peak, 0.0, max(total - warmup, 1)),
      "cosine": optax.cosine_decay_schedule(peak, max(total - warmup, 1)),
  }[decay]
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def create_state(cfg: SAEConfig, tx: optax.GradientTransformation, *, seed: int,
                 b_dec=None, plan: KernelPlan | None = None) -> tuple[nnx.GraphDef, nnx.State]:
  """A fresh model and its optimizer, split. Traceable, so it can run under jit with
  out_shardings (parameters are then born sharded). `plan`: see SparseAutoencoder."""
  model = SparseAutoencoder(cfg, rngs=nnx.Rngs(seed), plan=plan)
  if b_dec is not None:
    model.b_dec[...] = jnp.asarray(b_dec, jnp.float32).reshape(cfg.d_in)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  return nnx.split((model, optimizer))


def losses(model: SparseAutoencoder, x: jax.Array, dead: jax.Array):
  """(loss, metrics, (indices, values) of the top-k) for a batch x [B, d]."""
  cfg = model.cfg
  x = x.astype(jnp.float32)
  values, indices, aux_values, aux_indices = model.select(x, dead)
  decoding = dict(weight_grads=cfg.weight_grads, compute_dtype=cfg.compute_dtype)
  if model.picks_per_shard():
    decoding["picks_per_shard"] = True
  sparse_decode = functools.partial(kernels().sparse_decode, model.plan, **decoding)
  W_dec, b_dec = model.decoder_rows(), model.b_dec[...]  # unit rows (free norms divided out)
  total_variance = jnp.sum(jnp.square(x - x.mean(0)))

  top_values, top_indices, extra = cfg.arch.select(cfg, values, indices)
  widths = cfg.matryoshka_prefixes
  picks = matryoshka.group_picks(widths, top_values, top_indices)

  num_dead = jnp.sum(dead)
  if cfg.num_aux:
    # AuxK's decode (and its backward) runs only while some latent is dead; e_hat is 0 otherwise.
    if sharded.active():
      decoding["auxk_select"] = cfg.auxk_select
    decoded, e_hat = kernels().decode_with_aux(model.plan, picks(len(widths)), top_indices,
                                               aux_values, aux_indices, num_dead > 0, W_dec,
                                               **decoding)
  else:
    decoded = sparse_decode(picks(len(widths)), top_indices, W_dec)
  inner = matryoshka.inner_reconstructions(lambda p: sparse_decode(p, top_indices, W_dec),
                                           widths, picks)
  x_hat = (inner[-1] + decoded if inner else decoded) + b_dec
  metrics = _reconstruction_metrics(x, x_hat, top_values, total_variance)
  metrics["dead_fraction"] = jnp.mean(dead.astype(jnp.float32))
  loss, prefix_metrics = matryoshka.loss(widths, metrics["fvu"], x, inner, b_dec, total_variance)
  metrics.update(prefix_metrics)
  metrics.update(extra)

  multi_topk_fvu = jnp.float32(0)
  if cfg.multi_topk:
    # The top-4k reconstruction is the top-k one plus the next 3k picks.
    x_hat_4k = x_hat + sparse_decode(values[:, cfg.k:], indices[:, cfg.k:], W_dec)
    multi_topk_fvu = jnp.sum(jnp.square(x - x_hat_4k)) / total_variance
    loss = loss + multi_topk_fvu / 8
  metrics["multi_topk_fvu"] = multi_topk_fvu

  auxk_loss = jnp.float32(0)
  if cfg.num_aux:
    # The dead latents reconstruct the residual; no b_dec (it is already in x_hat). With nothing
    # dead the scale is 0, and so are this loss and its gradient.
    residual = jax.lax.stop_gradient(x - x_hat)
    scale = jnp.minimum(num_dead / cfg.num_aux, 1.0)
    auxk_loss = scale * jnp.sum(jnp.square(e_hat - residual)) / total_variance
    loss = loss + cfg.auxk_alpha * auxk_loss
  metrics["auxk_loss"] = auxk_loss
  metrics["loss"] = loss
  return loss, metrics, (top_indices, top_values)


def _reconstruction_metrics(x, x_hat, top_values, total_variance):
  sq_err = jnp.sum(jnp.square(x - x_hat))
  return {"fvu": sq_err / total_variance, "mse": sq_err / x.size,
          "l0": jnp.mean(jnp.sum(top_values > 0, axis=1).astype(jnp.float32))}


def train_step(graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array
               ) -> tuple[nnx.State, dict[str, jax.Array]]:
  model, optimizer = nnx.merge(graphdef, state)
  dead = model.dead_mask()

  def loss_fn(model):
    loss, metrics, top = losses(model, x, dead)
    return loss, (metrics, top)

  (_, (metrics, (top_indices, top_values))), grads = nnx.value_and_grad(
      loss_fn, has_aux=True)(model)
  if model.cfg.decoder_norm == "unit":
    # Adam must not move a decoder row along itself: the renorm below would undo it.
    g, W = grads["W_dec"][...], model.W_dec[...]
    grads["W_dec"][...] = g - row_dots(model.plan, g, W)[:, None] * W
  metrics["grad_norm"] = global_norm(model.plan, grads)
  if not model.plan.accelerator:
    # XLA:CPU otherwise wrote each gradient's square out as one more [n, d] array for Adam's
    # second moment (the step: 768 against 781 ms, 696 against 710, in two interleaved A/Bs).
    grads = jax.tree.map(jax.lax.optimization_barrier, grads)
  metrics.update(model.cfg.arch.update_state(model, top_values, optimizer.step[...]))
  optimizer.update(model, grads)
  model.normalize_decoder()
  model.record_firing(top_indices, top_values, x.shape[0])
  metrics = {name: value.astype(jnp.float32) for name, value in metrics.items()}
  return nnx.state((model, optimizer)), metrics


def global_norm(plan: KernelPlan, grads) -> jax.Array:
  """optax.tree.norm(grads), with the [n, d] matrices summed by `row_dots`: on CPU a native kernel
  on all cores, where XLA's reduction ran on one (~2.5 ms each at 16384 x 512)."""
  squares = [jnp.sum(row_dots(plan, g, g)) if g.ndim == 2 else jnp.vdot(g, g)
             for g in jax.tree.leaves(grads)]
  return jnp.sqrt(sum(squares))


def eval_metrics(graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array) -> dict[str, jax.Array]:
  """fvu, mse and l0 of the reconstruction as a user encodes (the architecture's inference
  encoder: TopK, or BatchTopK's JumpReLU at the learned threshold with no cap on the latents a row
  keeps), without touching the state."""
  model, _ = nnx.merge(graphdef, state)
  x = x.astype(jnp.float32)
  total_variance = jnp.sum(jnp.square(x - x.mean(0)))
  x_hat, active = model.cfg.arch.reconstruct(model, x)
  return _reconstruction_metrics(x, x_hat, active, total_variance)
