"""Synthetic data with a planted dictionary whose features fire at power-law frequencies, an SAE
trained on it in one jitted loop, and how well the SAE recovered the frequent and the rare features.
Used by tests/test_planted.py and benchmarks/planted_architectures.py."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sae_jax.training import step as step_lib
from sae_jax.config import SAEConfig
from sae_jax.model import geometric_median


def directions(num: int, d: int, seed: int = 0) -> jax.Array:
  """`num` random unit directions in R^d, float32 [num, d]."""
  w = np.random.default_rng(seed).normal(size=(num, d))
  return jnp.asarray(w / np.linalg.norm(w, axis=1, keepdims=True), jnp.float32)


def frequencies(num: int, exponent: float) -> np.ndarray:
  """Feature i's share of the firings, proportional to (i + 1)^-exponent (Zipf's law)."""
  share = (np.arange(num) + 1.0) ** -exponent
  return share / share.sum()


def batch(key, planted: jax.Array, log_freq: jax.Array, rows: int, active: int,
          noise: float) -> jax.Array:
  """Each row: `active` distinct planted features drawn without replacement in proportion to
  their frequencies (Gumbel top-k), coefficients uniform in [0.5, 1.5], plus Gaussian noise."""
  pick_key, coef_key, noise_key = jax.random.split(key, 3)
  scores = log_freq + jax.random.gumbel(pick_key, (rows, len(log_freq)))
  _, picks = jax.lax.top_k(scores, active)
  coefs = jax.random.uniform(coef_key, (rows, active), minval=0.5, maxval=1.5)
  x = jnp.einsum("bj,bjd->bd", coefs, planted[picks])
  return x + noise * jax.random.normal(noise_key, x.shape)


def independent_batch(key, planted: jax.Array, prob: jax.Array, rows: int, offset: jax.Array,
                      noise: float) -> jax.Array:
  """The harder data of issue 20: feature i fires in a row on its own with probability prob[i]
  (so L0 varies from row to row), log-normal(0, 0.5) magnitudes, a shared offset, Gaussian noise."""
  pick_key, coef_key, noise_key = jax.random.split(key, 3)
  on = jax.random.uniform(pick_key, (rows, len(prob))) < prob
  coefs = jnp.exp(0.5 * jax.random.normal(coef_key, (rows, len(prob)))) * on
  x = coefs @ planted + offset
  return x + noise * jax.random.normal(noise_key, x.shape)


def train(cfg: SAEConfig, planted: jax.Array, freq: np.ndarray, *, steps: int, rows: int,
          active: int, noise: float, lr: float, seed: int = 0):
  """Trains on `steps` fresh batches in one jitted loop: (graphdef, state, last step's metrics)."""
  log_freq = jnp.log(jnp.asarray(freq, jnp.float32))
  return train_on(cfg, lambda i: batch(jax.random.PRNGKey(i), planted, log_freq, rows, active,
                                       noise), steps=steps, lr=lr, seed=seed)


def train_on(cfg: SAEConfig, make, *, steps: int, lr: float, seed: int = 0):
  """Trains on the batches make(0), ..., make(steps - 1) in one jitted loop (b_dec at the geometric
  median of make(10**6)): (graphdef, state, last step's metrics)."""
  sample = make(10**6)
  graphdef, state = step_lib.create_state(cfg, step_lib.make_optimizer(lr), seed=seed,
                                          b_dec=geometric_median(sample))

  @jax.jit
  def loop(state):
    metrics = jax.eval_shape(lambda s: step_lib.train_step(graphdef, s, sample)[1], state)
    init = (state, jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype), metrics))
    return jax.lax.fori_loop(0, steps, lambda i, c: step_lib.train_step(graphdef, c[0], make(i)),
                             init)

  state, metrics = loop(state)
  return graphdef, state, metrics


def cosines(graphdef, state, planted: jax.Array) -> np.ndarray:
  """[planted features, latents]: the cosine of each unit planted direction with each decoder row
  (free decoder norms included)."""
  model, _ = nnx.merge(graphdef, state)
  rows = np.asarray(model.W_dec[...])
  return np.asarray(planted) @ (rows / np.linalg.norm(rows, axis=1, keepdims=True)).T


def recovery(graphdef, state, planted: jax.Array, cosine: float = 0.9) -> np.ndarray:
  """Per planted feature: whether some decoder row has cosine > `cosine` with it."""
  return cosines(graphdef, state, planted).max(axis=1) > cosine


def best_latent(graphdef, state, planted: jax.Array) -> np.ndarray:
  """Per planted feature, the index of the decoder row closest to it."""
  return cosines(graphdef, state, planted).argmax(axis=1)
