"""End to end: each architecture recovers a planted dictionary whose features fire at power-law
frequencies, the rare ones included (benchmarks/planted_architectures.py measures the same data
over several seeds)."""

import jax
import numpy as np
import pytest

import planted

from sae_jax.training import step as step_lib
from sae_jax.config import SAEConfig

D, M, N, K = 32, 64, 128, 4  # input dim, planted directions, latents, k
ACTIVE, NOISE, ROWS, STEPS = 3, 0.01, 256, 2000  # per row: 3 features; batches of 256 rows


# Per architecture: the least share of the 32 most frequent and of the 16 rarest features that must
# be recovered (BatchTopK spends its spare budget on splitting loud features: docs/benchmarks.md).
# Matryoshka TopK's rare share spreads over seeds: 0.81 on average over six (0.78 with unit decoder
# rows), 11 of 16 on this one.
@pytest.mark.parametrize("extra, frequent, rare", [
    (dict(), 0.9, 0.8),
    (dict(architecture="batchtopk"), 0.8, 0.5),
    (dict(matryoshka_prefixes=(16, 64)), 0.75, 0.625),
    (dict(architecture="batchtopk", matryoshka_prefixes=(16, 64)), 0.7, 0.35),
], ids=["topk", "batchtopk", "matryoshka-topk", "matryoshka-batchtopk"])
def test_training_recovers_frequent_and_rare_planted_features(extra, frequent, rare):
  directions = planted.directions(M, D)
  freq = planted.frequencies(M, 1.0)  # the rarest fires 64x less often than the most frequent
  cfg = SAEConfig(d_in=D, num_latents=N, k=K, dead_tokens=50 * ROWS,
                  threshold_start_step=STEPS // 4, **extra)
  graphdef, state, metrics = planted.train(cfg, directions, freq, steps=STEPS, rows=ROWS,
                                           active=ACTIVE, noise=NOISE, lr=3e-3)
  found = planted.recovery(graphdef, state, directions)
  summary = (found[:M // 2].mean(), found[-M // 4:].mean(),
             {k: float(v) for k, v in metrics.items()})
  assert found[:M // 2].mean() >= frequent and found[-M // 4:].mean() >= rare, summary
  # As a user encodes (BatchTopK: the JumpReLU at the learned threshold), on held-out rows. With
  # the threshold never learned, BatchTopK's L0 here was 13.5 (all 16 candidates that are > 0).
  x = planted.batch(jax.random.PRNGKey(10**7), directions, np.log(freq), 4096, ACTIVE, NOISE)
  evaluated = step_lib.eval_metrics(graphdef, state, x)
  assert float(evaluated["fvu"]) < 0.06, summary
  assert 0.8 * K <= float(evaluated["l0"]) <= 1.2 * K, (float(evaluated["l0"]), summary)
  if cfg.matryoshka_prefixes:  # the most frequent features live in the first prefix
    best = planted.best_latent(graphdef, state, directions)
    assert np.median(best[:16]) < 16, best


# The harder data of issue 20 (docs/benchmarks.md, "Why BatchTopK fell behind"), scaled down: 256
# directions in R^32 (8x more than dimensions), each firing on its own (L0 varies, 4 on average),
# log-normal magnitudes, a shared offset of norm ~11. TopK-8 recovers 0.77 of the frequent half and
# 0.53 of the rarest quarter in 1500 steps; BatchTopK 0.13 and 0 (unit decoder rows: 0.76 / 0.44
# and 0.13 / 0).
HARD_D, HARD_M, HARD_N, HARD_K, HARD_ROWS, HARD_STEPS = 32, 256, 512, 8, 512, 1500


@pytest.mark.parametrize("architecture", [
    "topk",
    pytest.param("batchtopk", marks=pytest.mark.xfail(
        strict=True, reason="on data like this BatchTopK's loss is lower away from the planted "
        "directions (issue 20; docs/benchmarks.md, 'Why BatchTopK fell behind')")),
])
def test_recovery_on_superposed_features_with_varying_l0(architecture):
  directions = planted.directions(HARD_M, HARD_D)
  prob = np.minimum(4 * planted.frequencies(HARD_M, 1.0), 1.0).astype(np.float32)
  offset = 2 * np.random.default_rng(1).normal(size=HARD_D).astype(np.float32)
  cfg = SAEConfig(d_in=HARD_D, num_latents=HARD_N, k=HARD_K, architecture=architecture,
                  dead_tokens=50 * HARD_ROWS, threshold_start_step=HARD_STEPS // 4)
  graphdef, state, metrics = planted.train_on(
      cfg, lambda i: planted.independent_batch(jax.random.PRNGKey(i), directions, prob,
                                               HARD_ROWS, offset, 0.02),
      steps=HARD_STEPS, lr=3e-3)
  found = planted.recovery(graphdef, state, directions)
  summary = (found[:HARD_M // 2].mean(), found[-HARD_M // 4:].mean(), float(metrics["fvu"]))
  assert found[:HARD_M // 2].mean() >= 0.6 and found[-HARD_M // 4:].mean() >= 0.25, summary
