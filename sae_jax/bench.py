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

from sae_jax import aot, cli, config, logs
from sae_jax.kernels import perf, sharding
from sae_jax.training import step as step_lib
from sae_jax.config import RunConfig, SAEConfig
from sae_jax.kernels.kernel_plan import KernelPlan

FLAGS = flags.FLAGS

# The SAE's knobs and the shared run knobs (batch_size, seed, mesh) as sae_jax.train has them.
config.define_flags(SAEConfig, RunConfig, bench_only=True)
flags.adopt_module_key_flags(config)  # so that --help lists them as this command's
_D_IN = flags.DEFINE_integer("d_in", 512, "Input width.")
_NUM_LATENTS = flags.DEFINE_integer("num_latents", 16384, "SAE width.")
_STORE_DTYPE = flags.DEFINE_enum(
    "store_dtype", "bfloat16", ["float32", "float16", "bfloat16", "float8_e4m3fn"],
    "--aot_devices/--aot_topology: the dtype of the store the planned run reads (harvest's "
    "--dtype); the step is compiled on batches of it.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps (compilation, first-touch).")
_AOT_DEVICES = flags.DEFINE_integer(
    "aot_devices", 0, "Instead of timing: compile the step ahead of time for a virtual mesh of "
    "this many CPU devices (no allocation) and report per-device memory and collectives.",
    lower_bound=0)
_AOT_TOPOLOGY = flags.DEFINE_string(
    "aot_topology", None, "Instead of timing: compile the step ahead of time for this TPU slice "
    "(e.g. v5e:2x4, v4:2x2x2, v5p:2x2x1, v6e:4x4) with libtpu's compiler and report per-chip "
    "memory, collectives and cost analysis. Needs the tpu extra, not a TPU.")
_PROFILE_DIR = flags.DEFINE_string(
    "profile_dir", None, "After timing, trace 3 more steps with jax.profiler into this folder "
    "(TensorBoard/XProf, and perfetto_trace.json.gz: benchmarks/trace_summary.py sums it by op).")


def main():
  logs.quiet_libraries()
  if _AOT_DEVICES.value and _AOT_TOPOLOGY.value:
    raise aot.TopologyError("--aot_devices and --aot_topology: give one")
  if _AOT_DEVICES.value:
    jax.config.update("jax_num_cpu_devices", _AOT_DEVICES.value)  # before the backend starts
  values = config.flag_values(SAEConfig, RunConfig, bench_only=True)
  batch_size, seed = values["batch_size"], values["seed"]
  try:
    cfg = config.build(SAEConfig, values, d_in=_D_IN.value, num_latents=_NUM_LATENTS.value)
  except ValueError as e:  # each message starts with the flag's name
    raise app.UsageError(f"--{e}") from e
  if _AOT_DEVICES.value or _AOT_TOPOLOGY.value:
    devices = (aot.tpu_devices(_AOT_TOPOLOGY.value) if _AOT_TOPOLOGY.value else
               jax.devices("cpu"))
    try:
      mesh = sharding.make_mesh(FLAGS.mesh, devices)
    except ValueError as e:  # the message names --mesh
      raise aot.TopologyError(str(e)) from e
    print(json.dumps({**aot.plan(cfg, mesh, batch_size, _STORE_DTYPE.value),
                      "topology": _AOT_TOPOLOGY.value,
                      "config": {**dataclasses.asdict(cfg), "batch_size": batch_size,
                                 "store_dtype": _STORE_DTYPE.value}}))
    return
  plan = KernelPlan.for_devices(jax.devices())
  tx = step_lib.make_optimizer(step_lib.default_learning_rate(cfg.num_latents))
  graphdef, state = step_lib.create_state(cfg, tx, seed=seed, b_dec=None, plan=plan)
  x = jax.random.normal(jax.random.PRNGKey(seed + 1), (batch_size, cfg.d_in))

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
      "tokens_per_s": round(batch_size / step_ms * 1e3, 1),
      "step_ms": round(step_ms, 2),
      "floor_ms": round(floor_ms, 2),
      "floor_fraction": round(floor_ms / step_ms, 4),
      "step_cpu_ms": round(step_cpu_ms, 2),
      "floor_cpu_ms": round(floor_cpu_ms, 2),
      "config": {**dataclasses.asdict(cfg), "batch_size": batch_size, "steps": _STEPS.value,
                 "warmup": _WARMUP.value},
      "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind} x{jax.device_count()}",
      "kernel_plan": plan.to_json(),
  }))


if __name__ == "__main__":
  cli.run(main, (aot.TopologyError,))
