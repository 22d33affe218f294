"""AuxK over latent shards: "per_shard" (each shard's own top dead latents, k_aux in all: k_aux // m
each, one more on the first k_aux % m shards; no candidates gathered) against "exact" (the global
top k_aux) and a float64 numpy reference of each, on planted data, m fake CPU devices in a fresh
process: 4 shards, which divide k_aux = 8, and 3, which do not."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = """
import sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from sae_jax.kernels import sharding
from sae_jax.training import step as step_lib
from sae_jax.config import SAEConfig

M = int(sys.argv[1])  # latent shards of N / M = 16 latents
D, N, K, K_AUX, B = 16, 16 * M, 3, 8, 48
rng = np.random.default_rng(0)
# Planted data: each row a sparse combination of 3 of 24 unit directions, plus noise.
directions = rng.normal(size=(24, D))
directions /= np.linalg.norm(directions, axis=1, keepdims=True)
coefs = np.zeros((B, 24))
for row in coefs:
  row[rng.choice(24, 3, replace=False)] = rng.uniform(0.5, 1.5, 3)
x = (coefs @ directions + 0.01 * rng.normal(size=(B, D))).astype(np.float32)
init_b_enc = rng.normal(0.3, 0.1, N).astype(np.float32)  # most pre-activations positive

def shard_picks(s):
  return K_AUX // M + (s < K_AUX % M)

def reference(p, dead, per_shard, picks=shard_picks):
  # float64: the top-k reconstruction, then AuxK's picks among dead latents and its loss. Free
  # decoder norms (the default): values are pre-activations times the norms, decoded by unit rows.
  xf = x.astype(np.float64)
  norms = np.linalg.norm(p["W_dec"], axis=1)
  rows = p["W_dec"] / norms[:, None]
  pre = np.maximum((xf - p["b_dec"]) @ p["W_enc"].T + p["b_enc"], 0) * norms
  idx = np.argsort(-pre, axis=1, kind="stable")[:, :K]
  x_hat = np.einsum("bk,bkd->bd", np.take_along_axis(pre, idx, 1), rows[idx]) + p["b_dec"]
  masked = np.where(dead, pre, -1.0)
  if per_shard:
    local = N // M
    picks = [s * local + np.argsort(-masked[:, s * local:(s + 1) * local], axis=1,
                                    kind="stable")[:, :picks(s)] for s in range(M)]
    aux_idx = np.concatenate(picks, axis=1)
  else:
    aux_idx = np.argsort(-masked, axis=1, kind="stable")[:, :K_AUX]
  aux_val = np.maximum(np.take_along_axis(masked, aux_idx, 1), 0)
  e_hat = np.einsum("bk,bkd->bd", aux_val, rows[aux_idx])
  variance = np.sum((xf - xf.mean(0)) ** 2)
  scale = min(dead.sum() / K_AUX, 1.0)
  return scale * np.sum((e_hat - (xf - x_hat)) ** 2) / variance

def auxk_loss(auxk_select, dead):
  cfg = SAEConfig(d_in=D, num_latents=N, k=K, k_aux=K_AUX, dead_tokens=10,
                  auxk_select=auxk_select, decoder_norm="free")
  graphdef, state = step_lib.create_state(cfg, step_lib.make_optimizer(1e-3), seed=0)
  model, optimizer = nnx.merge(graphdef, state)
  model.b_enc[...] = jnp.asarray(init_b_enc)
  model.tokens_since_fired[...] = jnp.asarray(np.where(dead, 100, 0), jnp.int32)
  params = {n: np.asarray(getattr(model, n)[...], np.float64)
            for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
  graphdef, state = nnx.split((model, optimizer))
  mesh = sharding.make_mesh(f"data:1,model:{M}")
  with jax.set_mesh(mesh):
    shardings = sharding.state_shardings(jax.eval_shape(lambda: state), mesh)
    state = jax.device_put(state, shardings)
    _, metrics = jax.jit(lambda s, x: step_lib.train_step(graphdef, s, x))(state, jnp.asarray(x))
  return float(metrics["auxk_loss"]), params

# Planted dead sets: spread, each shard holding exactly its share of dead latents (the two forms
# pick the same latents); all on one shard (per_shard keeps its share of the 8, exact all 8); and
# 5 on every shard (per_shard takes exactly K_AUX of them, not M * ceil(K_AUX / M)).
assert sum(shard_picks(s) for s in range(M)) == K_AUX
spread = np.zeros(N, bool)
for s in range(M):
  spread[16 * s + np.arange(shard_picks(s)) * 5 + 1] = True
clustered = np.zeros(N, bool)
clustered[16:24] = True
plenty = np.zeros(N, bool)
for s in range(M):
  plenty[16 * s + np.arange(5) * 3] = True
for name, dead in (("spread", spread), ("clustered", clustered), ("plenty", plenty)):
  per_shard, params = auxk_loss("per_shard", dead)
  exact, _ = auxk_loss("exact", dead)
  np.testing.assert_allclose(per_shard, reference(params, dead, True), rtol=1e-4, err_msg=name)
  np.testing.assert_allclose(exact, reference(params, dead, False), rtol=1e-4, err_msg=name)
  if name == "spread":
    np.testing.assert_allclose(per_shard, exact, rtol=1e-5)
  else:
    # Other latents reconstruct the residual (a shard's share of its dead, where exact takes the
    # global top 8).
    assert abs(per_shard - exact) > 1e-3 * exact, (per_shard, exact)
  if name == "plenty" and K_AUX % M:
    # The old rule, ceil(K_AUX / M) picks on every shard (9 for 3 shards), gives another loss.
    ceil_rule = reference(params, dead, True, picks=lambda s: -(-K_AUX // M))
    assert abs(per_shard - ceil_rule) > 1e-3 * ceil_rule, (per_shard, ceil_rule)
print("ok")
"""


@pytest.mark.parametrize("shards", [4, 3])
def test_per_shard_auxk_against_exact_and_a_float64_reference(shards):
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={shards}"}
  result = subprocess.run([sys.executable, "-c", SCRIPT, str(shards)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().endswith("ok")
