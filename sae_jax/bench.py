"""Training-step throughput on random data, against the floor of the step.

The floor is what no TopK SAE step can avoid: the dense encoder matmul (2*B*d*n FLOPs) and the
top-k over [B, n], jitted alone. Everything else in a step is O(B*k*d) plus the optimizer's O(n*d).

  python -m sae_jax.bench --d_in=512 --num_latents=16384 --k=32 --batch_size=4096

prints one JSON line: tokens_per_s, step_ms, floor_ms, floor_fraction (= floor_ms / step_ms),
step_cpu_ms and floor_cpu_ms (process CPU time, a cross-check on a busy host), config, device and
kernel_plan.

  python -m sae_jax.bench --aot_topology=v5e:2x4 --mesh=data:1,model:8 --d_in=4096 ...
  python -m sae_jax.bench --aot_devices=8 --mesh=data:1,model:8 ...

compile the training step ahead of time instead (sae_jax.aot): for a TPU slice with libtpu's
compiler (`pip install -e ".[tpu]"`, no TPU needed), or for a virtual mesh of CPU devices, and
print its per-chip memory, collectives and cost analysis. --architecture, --batchtopk_max_k and
--matryoshka_prefixes time or plan the BatchTopK and Matryoshka steps (the floor stays TopK's).
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
from absl import app, flags

from sae_jax import aot, cli, logs, perf, sharded, sharding
from sae_jax import step as step_lib
from sae_jax.kernel_plan import KernelPlan
from sae_jax.model import ARCHITECTURES, SAEConfig
from sae_jax.select import TOPK_METHODS

_D_IN = flags.DEFINE_integer("d_in", 512, "Input width.")
_NUM_LATENTS = flags.DEFINE_integer("num_latents", 16384, "SAE width.")
_K = flags.DEFINE_integer("k", 32, "Active latents per token.")
_BATCH = flags.DEFINE_integer("batch_size", 4096, "Tokens per step.")
_DTYPE = flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"],
                           "Encoder matmul dtype.")
_STORE_DTYPE = flags.DEFINE_enum(
    "store_dtype", "bfloat16", ["float32", "float16", "bfloat16", "float8_e4m3fn"],
    "--aot_devices/--aot_topology: the dtype of the store the planned run reads (harvest's "
    "--dtype); the step is compiled on batches of it.")
_TOPK = flags.DEFINE_enum("topk", "exact", list(TOPK_METHODS), "Top-k implementation.")
_TOPK_RECALL = flags.DEFINE_float("topk_recall", 0.95, "Recall target of --topk=approx.",
                                  lower_bound=0, upper_bound=1)
_WEIGHT_GRADS = flags.DEFINE_enum("weight_grads", "auto", ["auto", "scatter", "matmul"],
                                  "How the backward forms the weight gradients (see train).")
_ARCHITECTURE = flags.DEFINE_enum("architecture", "topk", list(ARCHITECTURES),
                                  "The step's selection, as sae_jax.train's --architecture.")
_BATCHTOPK_MAX_K = flags.DEFINE_integer(
    "batchtopk_max_k", 0, "BatchTopK: candidates per token (0: min(4k, num_latents)).",
    lower_bound=0)
_MATRYOSHKA_PREFIXES = flags.DEFINE_list(
    "matryoshka_prefixes", [], "Matryoshka: increasing inner dictionary widths (as train's).")
_MULTI_TOPK = flags.DEFINE_bool("multi_topk", False, "Add the Multi-TopK (4k) loss.")
_AUXK_ALPHA = flags.DEFINE_float("auxk_alpha", 1 / 32, "AuxK coefficient.")
_DEAD_TOKENS = flags.DEFINE_integer(
    "dead_tokens", 10_000_000, "Tokens without firing before a latent counts as dead. With the "
    "default no latent dies in a benchmark and AuxK costs only its skipped branch; 0 makes every "
    "latent that did not fire in the previous batch dead, so AuxK runs in every timed step, as in "
    "a real run with dead latents.", lower_bound=0)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps (compilation, first-touch).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of parameters and data.")
_AOT_DEVICES = flags.DEFINE_integer(
    "aot_devices", 0, "Instead of timing: compile the step ahead of time for a virtual mesh of "
    "this many CPU devices (no allocation) and report per-device memory and collectives.",
    lower_bound=0)
_K_AUX = flags.DEFINE_integer("k_aux", 0, "AuxK width (0: d_in / 2).", lower_bound=0)
_SHARD_CAPACITY = flags.DEFINE_float("shard_capacity", 0.0, "Per-shard top-k candidate budget "
                                     "(see sae_jax.train); 0: exact.", lower_bound=0)
_AUXK_SELECT = flags.DEFINE_enum("auxk_select", "per_shard", list(sharded.AUXK_SELECTS),
                                 "How AuxK selects over latent shards (see sae_jax.train).")
_AOT_TOPOLOGY = flags.DEFINE_string(
    "aot_topology", None, "Instead of timing: compile the step ahead of time for this TPU slice "
    "(e.g. v5e:2x4, v4:2x2x2, v5p:2x2x1, v6e:4x4) with libtpu's compiler and report per-chip "
    "memory, collectives and cost analysis. Needs the tpu extra, not a TPU.")
_PROFILE_DIR = flags.DEFINE_string(
    "profile_dir", None, "After timing, trace 3 more steps with jax.profiler into this folder "
    "(TensorBoard/XProf, and perfetto_trace.json.gz: benchmarks/trace_summary.py sums it by op).")
_MESH = flags.DEFINE_string("mesh", "data:-1,model:1",
                            "Mesh of --aot_devices or --aot_topology (one -1 fills).")


def main():
  logs.quiet_libraries()
  if _AOT_DEVICES.value and _AOT_TOPOLOGY.value:
    raise aot.TopologyError("--aot_devices and --aot_topology: give one")
  if _AOT_DEVICES.value:
    jax.config.update("jax_num_cpu_devices", _AOT_DEVICES.value)  # before the backend starts
  if not all(w.isdigit() for w in _MATRYOSHKA_PREFIXES.value):
    raise app.UsageError(f"--matryoshka_prefixes={','.join(_MATRYOSHKA_PREFIXES.value)}: "
                         "expected comma-separated latent counts")
  try:
    cfg = SAEConfig(d_in=_D_IN.value, num_latents=_NUM_LATENTS.value, k=_K.value,
                    multi_topk=_MULTI_TOPK.value, auxk_alpha=_AUXK_ALPHA.value,
                    dead_tokens=_DEAD_TOKENS.value,
                    compute_dtype=_DTYPE.value, topk=_TOPK.value, topk_recall=_TOPK_RECALL.value,
                    k_aux=_K_AUX.value or None,
                    shard_capacity=_SHARD_CAPACITY.value, weight_grads=_WEIGHT_GRADS.value,
                    auxk_select=_AUXK_SELECT.value, architecture=_ARCHITECTURE.value,
                    batchtopk_max_k=_BATCHTOPK_MAX_K.value,
                    matryoshka_prefixes=tuple(map(int, _MATRYOSHKA_PREFIXES.value)))
  except ValueError as e:  # each message starts with the flag's name
    raise app.UsageError(f"--{e}") from e
  if _AOT_DEVICES.value or _AOT_TOPOLOGY.value:
    devices = (aot.tpu_devices(_AOT_TOPOLOGY.value) if _AOT_TOPOLOGY.value else
               jax.devices("cpu"))
    try:
      mesh = sharding.make_mesh(_MESH.value, devices)
    except ValueError as e:  # the message names --mesh
      raise aot.TopologyError(str(e)) from e
    print(json.dumps({**aot.plan(cfg, mesh, _BATCH.value, _STORE_DTYPE.value),
                      "topology": _AOT_TOPOLOGY.value,
                      "config": {**dataclasses.asdict(cfg), "batch_size": _BATCH.value,
                                 "store_dtype": _STORE_DTYPE.value}}))
    return
  plan = KernelPlan.for_devices(jax.devices())
  tx = step_lib.make_optimizer(step_lib.default_learning_rate(cfg.num_latents))
  graphdef, state = step_lib.create_state(cfg, tx, seed=_SEED.value, b_dec=None, plan=plan)
  x = jax.random.normal(jax.random.PRNGKey(_SEED.value + 1), (_BATCH.value, cfg.d_in))

  train_step = jax.jit(step_lib.train_step, donate_argnums=1)
  holder = {"state": state}

  def run_step():
    holder["state"], metrics = train_step(graphdef, holder["state"], x)
    return metrics

  floor = perf.make_floor(cfg, plan)
  # Separate copies: the step donates (and so invalidates) the state's own buffers.
  params = {name: jnp.copy(state[0][name][...]) for name in ("W_enc", "b_enc", "b_dec")}
  ms = perf.time_interleaved({
      "step": run_step,
      "floor": lambda: floor(x, params["W_enc"], params["b_enc"], params["b_dec"]),
  }, _STEPS.value, _WARMUP.value)
  (step_ms, step_cpu_ms), (floor_ms, floor_cpu_ms) = ms["step"], ms["floor"]
  if _PROFILE_DIR.value:
    with jax.profiler.trace(_PROFILE_DIR.value, create_perfetto_trace=True):
      for _ in range(3):
        jax.block_until_ready(run_step())
  print(json.dumps({
      "tokens_per_s": round(_BATCH.value / step_ms * 1e3, 1),
      "step_ms": round(step_ms, 2),
      "floor_ms": round(floor_ms, 2),
      "floor_fraction": round(floor_ms / step_ms, 4),
      "step_cpu_ms": round(step_cpu_ms, 2),
      "floor_cpu_ms": round(floor_cpu_ms, 2),
      "config": {**dataclasses.asdict(cfg), "batch_size": _BATCH.value, "steps": _STEPS.value,
                 "warmup": _WARMUP.value},
      "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind} x{jax.device_count()}",
      "kernel_plan": plan.to_json(),
  }))


if __name__ == "__main__":
  cli.run(main, (aot.TopologyError,))
