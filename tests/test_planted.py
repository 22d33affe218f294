"""End to end: training recovers a planted dictionary from synthetic sparse data."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sae_jax import step as step_lib
from sae_jax.model import SAEConfig, geometric_median

D, M, N, K = 32, 64, 128, 4  # input dim, planted directions, latents, k
ACTIVE, NOISE = 3, 0.01  # planted directions per sample, noise std
BATCH, STEPS = 256, 3000


def planted_batch(key, directions):
  """Each row: ACTIVE distinct planted directions with coefficients in [0.5, 1.5], plus noise."""
  pick_key, coef_key, noise_key = jax.random.split(key, 3)
  scores = jax.random.uniform(pick_key, (BATCH, M))
  _, picks = jax.lax.top_k(scores, ACTIVE)  # ACTIVE distinct directions per row
  coefs = jax.random.uniform(coef_key, (BATCH, ACTIVE), minval=0.5, maxval=1.5)
  x = jnp.einsum("bj,bjd->bd", coefs, directions[picks])
  return x + NOISE * jax.random.normal(noise_key, x.shape)


def test_training_recovers_planted_directions():
  rng = np.random.default_rng(0)
  directions = rng.normal(size=(M, D))
  directions = jnp.asarray(directions / np.linalg.norm(directions, axis=1, keepdims=True),
                           jnp.float32)
  cfg = SAEConfig(d_in=D, num_latents=N, k=K, dead_tokens=50 * BATCH)
  tx = step_lib.make_optimizer(3e-3)
  sample = planted_batch(jax.random.PRNGKey(0), directions)
  graphdef, state = step_lib.create_state(cfg, tx, seed=0, b_dec=geometric_median(sample))

  @jax.jit
  def train(state):
    def body(i, carry):
      state, _ = carry
      x = planted_batch(jax.random.PRNGKey(i + 1), directions)
      return step_lib.train_step(graphdef, state, x)
    metrics = jax.eval_shape(lambda s: step_lib.train_step(graphdef, s, sample)[1], state)
    init = (state, jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype), metrics))
    return jax.lax.fori_loop(0, STEPS, body, init)

  state, metrics = train(state)
  model, _ = nnx.merge(graphdef, state)
  cosines = np.asarray(directions @ model.W_dec[...].T)  # [M, N], decoder rows are unit norm
  recovered = (cosines.max(axis=1) > 0.9).mean()
  assert recovered >= 0.9, (recovered, {k: float(v) for k, v in metrics.items()})
  assert float(metrics["fvu"]) < 0.1
