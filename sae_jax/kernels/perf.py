"""The floor of a training step and how calls are timed (shared by `bench` and `train`).

The floor is what no TopK SAE step can avoid: the dense encoder matmul (2*B*d*n FLOPs) and the
top-k over [B, n]. Everything else in a step is O(B*k*d) plus the optimizer's O(n*d).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax.kernels import sharded
from sae_jax.kernels import topk as topk_lib
from sae_jax.kernels.kernel_plan import KernelPlan
from sae_jax.config import SAEConfig


def make_floor(cfg: SAEConfig, plan: KernelPlan):
  """jitted (x, W_enc, b_enc, b_dec) -> top-k of the encoder: the floor of a step. Traced under a
  mesh of several devices, it runs per latent shard as the step does (sharded.sparse_encoder):
  a top-k left to XLA over sharded latents all-gathers the whole [B, n] matrix."""

  @jax.jit
  def floor(x, W_enc, b_enc, b_dec):
    args = (plan, cfg.k, 0, cfg.topk, cfg.topk_recall, cfg.compute_dtype)
    encode = (sharded.sparse_encoder(*args, capacity=cfg.shard_capacity) if sharded.active()
              else topk_lib.sparse_encoder(*args))
    dead = jnp.zeros((W_enc.shape[0],), bool)
    return encode(x, b_dec, W_enc, b_enc, dead)[:2]

  return floor


def time_interleaved(calls: dict, steps: int, warmup: int) -> dict[str, tuple[float, float]]:
  """Median (wall, process CPU) milliseconds of each zero-argument call, each waited for. The
  calls take turns, so that other load on the machine hits all of them alike; CPU time is the
  less noisy of the two on a shared host (on CPU backends, where the work is this process's)."""
  times = {name: [] for name in calls}
  for i in range(warmup + steps):
    for name, call in calls.items():
      wall, cpu = time.perf_counter(), time.process_time()
      jax.block_until_ready(call())
      if i >= warmup:
        times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
  return {name: tuple(np.median(np.array(t), axis=0) * 1e3) for name, t in times.items()}
