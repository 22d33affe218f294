r"""Trains a TopK sparse autoencoder on an activation store.

  python -m sae_jax.train --store=STORE --workdir=WORKDIR --k=32 --expansion_factor=16
  python -m sae_jax.train --flagfile=launch/configs/tiny_cpu.flags

Rerunning the same command resumes from the latest checkpoint in --workdir, exactly: the result is
bit-identical to a run that was never interrupted (same data order, same state). Only the flags in
RESUMABLE_FLAGS may change on resume. SIGTERM (a preemption notice) saves a checkpoint and exits
with status 143 (PREEMPTED_EXIT_CODE), so that `train && export` never exports half a run; with
several processes, every process saves the same step (JAX's preemption sync, through orbax) and
exits. The resolved flags go to WORKDIR/flags.json, metrics to WORKDIR/metrics.jsonl and
WORKDIR/tb/, and a one-line JSON summary is printed last ("preempted": true when stopped so); a
run stopped by its inputs or a non-finite loss prints {"ok": false, "error": ...} instead and
exits with status 1.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from pathlib import Path

from absl import flags, logging
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from sae_jax import checkpoint, cli, data, dictionary, distributed, logs, perf, sharded, sharding
from sae_jax.dictionary import DictionaryError
from sae_jax.kernel_plan import KernelPlan
from sae_jax.metrics import MetricWriter
from sae_jax.model import ARCHITECTURES, SAEConfig, geometric_median
from sae_jax.step import (create_state, default_learning_rate, eval_metrics, make_optimizer,
                          train_step)
from sae_jax.store import Store, StoreError, absolute, atomic_write_json

# Data.
_STORE = flags.DEFINE_string("store", None, "Activation store to train on.", required=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and flags go here; rerunning "
                               "with the same workdir resumes.", required=True)
_TOKEN_KINDS = flags.DEFINE_list("token_kinds", [], "Train only on rows of these token kinds "
                                 "(image_base, image_other, text); empty = all rows.")
_NORMALIZE_INPUTS = flags.DEFINE_bool(
    "normalize_inputs", False, "Scale inputs by one scalar so their mean squared norm is d_in "
    "(estimated from --init_sample_rows); the export folds the scale back in.")
_INIT_SAMPLE_ROWS = flags.DEFINE_integer(
    "init_sample_rows", 16384, "Rows sampled for the input scale and the b_dec init.", lower_bound=1)
# Model.
_EXPANSION_FACTOR = flags.DEFINE_integer("expansion_factor", 32, "num_latents = this * d_in, "
                                         "unless --num_latents is set.", lower_bound=1)
_NUM_LATENTS = flags.DEFINE_integer("num_latents", 0, "Dictionary size (0: from "
                                    "--expansion_factor).", lower_bound=0)
_K = flags.DEFINE_integer("k", 32, "Active latents per token.", lower_bound=1)
_MULTI_TOPK = flags.DEFINE_bool("multi_topk", False, "Add the Multi-TopK loss (top-4k FVU / 8).")
_AUXK_ALPHA = flags.DEFINE_float("auxk_alpha", 1 / 32, "AuxK loss coefficient (0 disables).",
                                 lower_bound=0)
_DEAD_TOKENS = flags.DEFINE_integer("dead_tokens", 10_000_000, "A latent that has not fired for "
                                    "this many tokens is dead.", lower_bound=1)
_K_AUX = flags.DEFINE_integer("k_aux", 0, "Dead latents AuxK reconstructs with (0: d_in / 2).",
                              lower_bound=0)
_SHARD_CAPACITY = flags.DEFINE_float(
    "shard_capacity", 0.0, "With latents split over the mesh's model axis: each shard offers "
    "ceil(this * k / shards) top-k candidates (>= 1; exact unless one shard holds more of a "
    "token's winners). 0: exact, min(k, latents per shard) each.", lower_bound=0)
_AUXK_SELECT = flags.DEFINE_enum(
    "auxk_select", "per_shard", list(sharded.AUXK_SELECTS), "With latents split over m shards: "
    "per_shard = AuxK reconstructs with each shard's own top ceil(k_aux / m) dead latents, no "
    "candidates cross chips; exact = the global top k_aux dead latents, an all-gather of "
    "[batch, m * k_aux] candidates every step. One device: exact either way.")
_ARCHITECTURE = flags.DEFINE_enum(
    "architecture", "topk", list(ARCHITECTURES), "topk: each token keeps its k largest latents. "
    "batchtopk: the batch keeps its batch_size * k largest (each token's top --batchtopk_max_k "
    "candidates); inference thresholds at a learned value (a JumpReLU).")
_BATCHTOPK_MAX_K = flags.DEFINE_integer(
    "batchtopk_max_k", 0, "BatchTopK: candidates per token (0: min(4k, num_latents)); the "
    "capped_fraction metric says how often a token might have had more.", lower_bound=0)
_THRESHOLD_BETA = flags.DEFINE_float("threshold_beta", 0.999, "BatchTopK: EMA weight of the old "
                                     "inference threshold.", lower_bound=0, upper_bound=1)
_THRESHOLD_START_STEP = flags.DEFINE_integer(
    "threshold_start_step", 1000, "BatchTopK: the step from which the inference threshold is "
    "learned.", lower_bound=0)
_MATRYOSHKA_PREFIXES = flags.DEFINE_list(
    "matryoshka_prefixes", [], "Matryoshka: increasing inner dictionary widths; the latents "
    "[0, w) alone must also reconstruct (the loss is the mean FVU over them and the full width).")
_B_DEC_INIT = flags.DEFINE_enum("b_dec_init", "median", ["median", "mean", "zeros"],
                                "Initial b_dec: geometric median or mean of a sample, or zeros.")
_INIT_FROM = flags.DEFINE_string("init_from", None, "Start from an exported dictionary (ours, or "
                                 "any sparsify/SAELens-layout folder) instead of a random init.")
_COMPUTE_DTYPE = flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"],
                                   "Matmul dtype; parameters and optimizer state stay float32.")
_TOPK = flags.DEFINE_enum("topk", "exact", ["exact", "approx"],
                          "exact: lax.top_k; approx: lax.approx_max_k (fast on TPU only).")
_TOPK_RECALL = flags.DEFINE_float("topk_recall", 0.95, "Recall target of --topk=approx.",
                                  lower_bound=0, upper_bound=1)
_WEIGHT_GRADS = flags.DEFINE_enum(
    "weight_grads", "auto", ["auto", "scatter", "matmul"], "How the backward forms the W_enc and "
    "W_dec gradients: scatter-add of the B*k picked rows, or a dense [n, B] x [B, d] matmul in "
    "--compute_dtype. auto: the matmul on GPU/TPU when latents (per shard) <= 1024 * k in "
    "bfloat16, 64 * k in float32.")
# Optimisation.
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 4096, "Global batch, in tokens.", lower_bound=1)
_STEPS = flags.DEFINE_integer("steps", 0, "Training steps (0: --epochs over the store).",
                              lower_bound=0)
_EPOCHS = flags.DEFINE_float("epochs", 1.0, "Passes over the store when --steps=0.", lower_bound=0)
_LR = flags.DEFINE_float("lr", 0.0, "Adam learning rate (0: 2e-4 / sqrt(num_latents / 2^14)).",
                         lower_bound=0)
_LR_WARMUP_STEPS = flags.DEFINE_integer("lr_warmup_steps", 1000, "Linear warmup steps.",
                                        lower_bound=0)
_LR_DECAY = flags.DEFINE_enum("lr_decay", "constant", ["constant", "linear", "cosine"],
                              "Learning-rate shape after the warmup (decays reach 0 at the end).")
_ADAM_B1 = flags.DEFINE_float("adam_b1", 0.9, "Adam beta1.")
_ADAM_B2 = flags.DEFINE_float("adam_b2", 0.999, "Adam beta2.")
_ADAM_EPS = flags.DEFINE_float("adam_eps", 6.25e-10, "Adam epsilon (OpenAI's TopK recipe).")
_GRAD_CLIP = flags.DEFINE_float("grad_clip", 0.0, "Global gradient-norm clip (0: none).",
                                lower_bound=0)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the init and the data order.")
# Devices.
_MESH = flags.DEFINE_string("mesh", "data:-1,model:1", "Mesh axis sizes; one -1 fills.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"], "Multi-process start-up: auto = when "
    "--coordinator_address is set or a TPU pod / SLURM job is detected.")
_COORDINATOR_ADDRESS = flags.DEFINE_string("coordinator_address", None,
                                           "host:port of process 0, for multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.",
                                      lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.", lower_bound=0)
# Bookkeeping.
_CHECKPOINT_EVERY = flags.DEFINE_integer("checkpoint_every", 1000, "Save every this many steps.",
                                         lower_bound=1)
_KEEP_CHECKPOINTS = flags.DEFINE_integer("keep_checkpoints", 3, "Checkpoints kept.", lower_bound=1)
_LOG_EVERY = flags.DEFINE_integer("log_every", 50, "Write metrics every this many steps.",
                                  lower_bound=1)
_READ_CHUNK_KB = flags.DEFINE_integer(
    "read_chunk_kb", 1024, "Bytes of contiguous rows per read request, in KiB (object storage "
    "wants >= 1 MiB).", lower_bound=1)
_SHUFFLE_BUFFER_MB = flags.DEFINE_integer(
    "shuffle_buffer_mb", 1024, "Memory, in MiB, of the rows read and not yet served: three windows "
    "of chunks (serving, ready, being read), each shuffled; larger mixes the rows better.",
    lower_bound=1)
_DATA_LANES = flags.DEFINE_integer(
    "data_lanes", 0, "Independent streams of windows the global batch is drawn from, in equal "
    "parts; each process reads its own lanes, so it must divide among them. The data order "
    "depends on this, not on the process count. 0: the number of processes.", lower_bound=0)
_READ_THREADS = flags.DEFINE_integer("read_threads", 16, "Read requests in flight.", lower_bound=1)
_PREFETCH_BATCHES = flags.DEFINE_integer(
    "prefetch_batches", 4, "Batches assembled ahead of the step, each batch_size / processes x "
    "d_in in the store's dtype (0: read and assemble each batch when it is due).", lower_bound=0)
_DEBUG_SIGNAL_AT_STEP = flags.DEFINE_integer(
    "debug_signal_at_step", 0, "Fault injection for tests: send --debug_signal to this process "
    "when this step is reached (after the checkpoints due before it are on disk).", lower_bound=0)
_DEBUG_SIGNAL = flags.DEFINE_enum("debug_signal", "SIGKILL", ["SIGKILL", "SIGTERM"],
                                  "Signal of --debug_signal_at_step.")

# What a resumed run may change: how long it runs and how it is carried out, not what it computes.
# Changing --steps/--epochs is also refused when the learning-rate schedule depends on the total.
RESUMABLE_FLAGS = frozenset({
    "workdir", "steps", "epochs", "checkpoint_every", "keep_checkpoints", "log_every",
    "read_threads", "prefetch_batches", "mesh", "distributed", "coordinator_address",
    "num_processes", "process_id", "debug_signal_at_step", "debug_signal"})


# The status of a run stopped by SIGTERM after saving: 128 + SIGTERM, as a shell reports a process
# that SIGTERM ended, so schedulers and `&&` chains see an unfinished run.
PREEMPTED_EXIT_CODE = 143


class TrainError(Exception):
  """A run that cannot go on (bad flags, a resume that would change the run, a non-finite loss);
  reported as one line."""


def resolved_flags() -> dict:
  """This module's flags as flags.json records them (JSON types, paths absolute)."""
  values = {h.name: h.value for h in globals().values() if isinstance(h, flags.FlagHolder)}
  for name in ("store", "init_from"):
    if values[name]:
      values[name] = absolute(values[name])
  return json.loads(json.dumps(values))


def flag_text(value) -> str:
  """A flag value as it is written on a command line."""
  if isinstance(value, list):
    return ",".join(map(str, value))
  if isinstance(value, bool):
    return str(value).lower()
  return "" if value is None else str(value)


def check_resumed_flags(workdir: Path, old: dict, new: dict) -> None:
  """Refuses a resume whose flags would change the run recorded in WORKDIR/flags.json."""
  for name, value in sorted(new.items()):
    if name not in RESUMABLE_FLAGS and name in old and old[name] != value:
      was = f"--{name}={flag_text(old[name])}"
      raise TrainError(f"--{name}={flag_text(value)} but the run in {workdir} used {was}; rerun "
                       f"with {was} to resume it, or use a new --workdir")


def check_resumed_total(workdir: Path, old_total: int, new_total: int) -> None:
  """Refuses a new total step count where the learning-rate schedule depends on it: a decay, or a
  warmup that the old total cut short."""
  warmup = _LR_WARMUP_STEPS.value
  if new_total != old_total and (_LR_DECAY.value != "constant" or
                                 min(warmup, old_total) != min(warmup, new_total)):
    raise TrainError(f"--steps/--epochs give {new_total} steps but the run in {workdir} has "
                     f"{old_total}, and its learning rate (--lr_decay={_LR_DECAY.value}, "
                     f"--lr_warmup_steps={warmup}) depends on the total; use a new --workdir")


def check_finite(step: int, metrics: dict, last_good: int | None, workdir: Path) -> None:
  loss = float(metrics["loss"])
  if not math.isfinite(loss):
    saved = (f"step {last_good} in {workdir / 'checkpoints'}" if last_good else
             "none (no checkpoint was saved)")
    raise TrainError(f"loss is {loss} at step {step}; the last good checkpoint is {saved}")


def write_note(note: str) -> None:
  if jax.process_index() == 0:
    logging.info("NOTE: %s", note)


def lr_schedule(peak: float, warmup: int, total: int, decay: str) -> optax.Schedule:
  warmup = min(warmup, total)
  after = {
      "constant": optax.constant_schedule(peak),
      "linear": optax.linear_schedule(peak, 0.0, max(total - warmup, 1)),
      "cosine": optax.cosine_decay_schedule(peak, max(total - warmup, 1)),
  }[decay]
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def log_metrics(writer: MetricWriter, progress: tqdm, schedule: optax.Schedule, floor_ms: float,
                step: int, device_metrics: dict, since_time: float, since_step: int, *,
                last_good: int | None, workdir: Path) -> dict:
  """Fetches a step's metrics (already computed: this runs one step late), stops the run if the
  loss is not finite, and writes them."""
  scalars = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
  check_finite(step, scalars, last_good, workdir)
  scalars["lr"] = float(schedule(step - 1))  # the rate that step's update used
  elapsed = time.perf_counter() - since_time
  scalars["tokens_per_s"] = (step - since_step) * _BATCH_SIZE.value / max(elapsed, 1e-9)
  scalars["floor_fraction"] = floor_ms * 1e-3 * (step - since_step) / max(elapsed, 1e-9)
  writer.write(step, scalars)
  progress.set_postfix(fvu=f"{scalars['fvu']:.4f}", dead=f"{scalars['dead_fraction']:.3f}",
                       tok_s=f"{scalars['tokens_per_s']:.3g}", refresh=False)
  return scalars


def measure_floor_ms(cfg: SAEConfig, plan: KernelPlan, state, x) -> float:
  """Wall milliseconds of the step's floor (encoder matmul + top-k, per latent shard as the step
  runs it) on this batch and these weights: `floor_fraction` in the metrics is this over the
  measured step time."""
  floor = perf.make_floor(cfg, plan)
  model = state[0]
  call = lambda: floor(x, model["W_enc"][...], model["b_enc"][...], model["b_dec"][...])
  return perf.time_interleaved({"floor": call}, steps=3, warmup=1)["floor"][0]


def main() -> None:
  logs.quiet_libraries()
  distributed.initialize(_DISTRIBUTED.value, _COORDINATOR_ADDRESS.value, _NUM_PROCESSES.value,
                         _PROCESS_ID.value)
  workdir = Path(_WORKDIR.value)
  run = checkpoint.read_run(workdir)
  new_flags = resolved_flags()
  old_flags = checkpoint.read_flags(workdir) if run is not None else None
  if old_flags is not None:
    check_resumed_flags(workdir, old_flags, new_flags)
  workdir.mkdir(parents=True, exist_ok=True)

  ##############################################################################################
  # Input: the store, the number of steps, the input scale.                                    #
  ##############################################################################################
  store = Store(_STORE.value)
  d_in = store.d_model
  token_kinds = _TOKEN_KINDS.value or None
  rows = data.ChunkReader(store, token_kinds, chunk_bytes=_READ_CHUNK_KB.value << 10,
                          read_threads=_READ_THREADS.value)
  if rows.num_rows < _BATCH_SIZE.value:
    raise StoreError(f"{store.path} has {rows.num_rows} selected rows, fewer than one batch "
                     f"(--batch_size={_BATCH_SIZE.value})")
  # Fixed at the first start (flags.json), so that a resume may use another number of processes.
  data_lanes = (old_flags["resolved"]["data_lanes"] if old_flags is not None else
                _DATA_LANES.value or jax.process_count())
  if _BATCH_SIZE.value % data_lanes or data_lanes % jax.process_count():
    raise TrainError(f"--batch_size={_BATCH_SIZE.value} must be divisible by the data lanes "
                     f"({data_lanes}), and they by the number of processes ({jax.process_count()})")
  per_epoch = rows.num_rows // _BATCH_SIZE.value
  total_steps = _STEPS.value or int(_EPOCHS.value * per_epoch)
  if total_steps <= 0:
    raise TrainError(f"--epochs={_EPOCHS.value} of {per_epoch} steps each is no training; "
                     "set --steps or a larger --epochs")
  if old_flags is not None:
    check_resumed_total(workdir, old_flags["resolved"]["total_steps"], total_steps)
  sample = None
  if run is not None:
    input_scale = run["input_scale"]
  elif _NORMALIZE_INPUTS.value:
    sample = data.sample_rows(rows, _INIT_SAMPLE_ROWS.value, seed=_SEED.value)
    input_scale = float(np.sqrt(d_in / np.mean(np.sum(sample.astype(np.float64) ** 2, axis=1))))
  else:
    input_scale = 1.0

  ##############################################################################################
  # Model and optimizer.                                                                       #
  ##############################################################################################
  init_params, init_info = None, None
  if _INIT_FROM.value:
    init_params, init_info = dictionary.read(_INIT_FROM.value)
    if init_info["d_in"] != d_in:
      raise StoreError(f"--init_from={_INIT_FROM.value} has d_in={init_info['d_in']} but "
                       f"--store={_STORE.value} has d_model={d_in}")
    # An export acts on raw activations; the trainer sees scale * x, so undo the export's folding.
    init_params = dictionary.fold_input_scale(init_params, 1 / input_scale)
  num_latents = (init_info["num_latents"] if init_info else
                 _NUM_LATENTS.value or _EXPANSION_FACTOR.value * d_in)
  if _K.value > num_latents:
    raise TrainError(f"--k={_K.value} exceeds the number of latents ({num_latents})")
  if not all(w.isdigit() for w in _MATRYOSHKA_PREFIXES.value):
    raise TrainError(f"--matryoshka_prefixes={','.join(_MATRYOSHKA_PREFIXES.value)}: expected "
                     "comma-separated latent counts")
  try:
    cfg = SAEConfig(d_in=d_in, num_latents=num_latents, k=_K.value, multi_topk=_MULTI_TOPK.value,
                    auxk_alpha=_AUXK_ALPHA.value, dead_tokens=_DEAD_TOKENS.value,
                    k_aux=_K_AUX.value or None, shard_capacity=_SHARD_CAPACITY.value,
                    auxk_select=_AUXK_SELECT.value, compute_dtype=_COMPUTE_DTYPE.value,
                    topk=_TOPK.value, topk_recall=_TOPK_RECALL.value,
                    weight_grads=_WEIGHT_GRADS.value, architecture=_ARCHITECTURE.value,
                    batchtopk_max_k=_BATCHTOPK_MAX_K.value, threshold_beta=_THRESHOLD_BETA.value,
                    threshold_start_step=_THRESHOLD_START_STEP.value,
                    matryoshka_prefixes=tuple(map(int, _MATRYOSHKA_PREFIXES.value)))
  except ValueError as e:  # each message starts with the flag's name
    raise TrainError(f"--{e}") from e
  if run is not None and SAEConfig(**run["sae"]) != cfg:
    raise TrainError(f"{workdir} holds a run with another SAE config ({run['sae']}); "
                     "use a new --workdir")
  peak_lr = _LR.value or default_learning_rate(num_latents)
  schedule = lr_schedule(peak_lr, _LR_WARMUP_STEPS.value, total_steps, _LR_DECAY.value)
  tx = make_optimizer(schedule,
                      b1=_ADAM_B1.value, b2=_ADAM_B2.value, eps=_ADAM_EPS.value,
                      grad_clip=_GRAD_CLIP.value or None)
  ##############################################################################################
  # Mesh, shardings and the initial state (born sharded, never whole on one device).           #
  ##############################################################################################
  try:
    mesh = sharding.make_mesh(_MESH.value)
  except ValueError as e:  # the message names --mesh
    raise TrainError(str(e)) from e
  data_shards = mesh.shape["data"]
  if _BATCH_SIZE.value % data_shards:
    raise TrainError(f"--batch_size={_BATCH_SIZE.value} must be divisible by the data axis of "
                     f"the mesh ({data_shards})")
  if num_latents % mesh.shape["model"]:
    raise TrainError(f"num_latents={num_latents} must be divisible by the model axis of the "
                     f"mesh ({mesh.shape['model']})")
  # The kernels for the devices the step is compiled for; `bench --aot_topology` plans the same.
  plan = KernelPlan.for_devices(mesh.devices.flat)
  if jax.process_index() == 0:
    atomic_write_json(workdir / checkpoint.FLAGS_FILE, {
        **new_flags, "resolved": {"num_latents": num_latents, "lr": peak_lr,
                                 "total_steps": total_steps, "steps_per_epoch": per_epoch,
                                 "input_scale": input_scale, "kernel_plan": plan.to_json(),
                                 "data_lanes": data_lanes}})
  write_note(f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} "
             f"devices, {jax.process_count()} process(es); {total_steps} steps of "
             f"{_BATCH_SIZE.value} tokens; kernels {plan}")

  def b_dec_init():
    if init_params is not None:
      return None
    if _B_DEC_INIT.value == "zeros":
      return jnp.zeros((d_in,), jnp.float32)
    scaled = input_scale * (sample if sample is not None else data.sample_rows(
        rows, _INIT_SAMPLE_ROWS.value, seed=_SEED.value))
    return geometric_median(scaled) if _B_DEC_INIT.value == "median" else jnp.asarray(
        scaled.mean(0))

  mngr = checkpoint.manager(workdir, keep=_KEEP_CHECKPOINTS.value)
  start_step = mngr.latest_step() or 0
  b_dec = None if start_step else b_dec_init()
  graphdef_box = []

  def init_state():
    graphdef, state = create_state(cfg, tx, seed=_SEED.value, b_dec=b_dec, plan=plan)
    if init_params is not None:
      model, optimizer = nnx.merge(graphdef, state)
      for name, value in init_params.items():
        getattr(model, name)[...] = jnp.asarray(value)
      graphdef, state = nnx.split((model, optimizer))
    graphdef_box.append(graphdef)
    return state

  with jax.set_mesh(mesh):
    abstract_state = jax.eval_shape(init_state)
    graphdef = graphdef_box[0]
    state_sharding = sharding.state_shardings(abstract_state, mesh)
    if start_step:
      write_note(f"resuming from step {start_step} of {workdir}")
      state = checkpoint.restore(mngr, start_step, abstract_state, state_sharding)
    else:
      state = jax.jit(init_state, out_shardings=state_sharding)()
      if jax.process_index() == 0:
        checkpoint.write_run(workdir, cfg=cfg, input_scale=input_scale, source={
            "store": absolute(_STORE.value), "model": store.manifest["model"],
            "hookpoint": store.manifest["hookpoint"], "layer": store.manifest["layer"],
            "token_kinds": token_kinds, "init_from": _INIT_FROM.value})

    ############################################################################################
    # The update step: jitted once, state donated so it is updated in place.                   #
    ############################################################################################
    def scaled_step(state, x):  # x as stored: 16-bit or fp8 rows cross to the device as such
      return train_step(graphdef, state, data.device_rows(x, store.dtype) * input_scale)

    update = jax.jit(scaled_step, in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
                     out_shardings=(state_sharding, None), donate_argnums=0)
    inference = None
    if cfg.architecture == "batchtopk":  # the JumpReLU at the learned threshold, at log steps
      inference = jax.jit(
          lambda state, x: eval_metrics(graphdef, state, data.device_rows(x, store.dtype) *
                                        input_scale),
          in_shardings=(state_sharding, sharding.batch_sharding(mesh)))

    ############################################################################################
    # Data, starting at the restored step.                                                      #
    ############################################################################################
    try:
      orders = data.lane_orders(
          rows, lanes=data_lanes, buffer_bytes=_SHUFFLE_BUFFER_MB.value << 20, seed=_SEED.value,
          process_index=jax.process_index(), process_count=jax.process_count())
    except ValueError as e:
      raise TrainError(f"--store={_STORE.value}, --read_chunk_kb={_READ_CHUNK_KB.value}, "
                       f"--data_lanes={data_lanes}: {e}") from e
    batches = data.batches(rows, orders, batch_rows=_BATCH_SIZE.value // jax.process_count(),
                           start_step=start_step, prefetch_batches=_PREFETCH_BATCHES.value)

    ############################################################################################
    # The loop.                                                                                 #
    ############################################################################################
    writer = MetricWriter(workdir, resume_step=start_step, enabled=jax.process_index() == 0)
    sigterm = []
    if jax.process_count() == 1:
      signal.signal(signal.SIGTERM, lambda *_: sigterm.append(True))
    # With several processes, JAX's preemption service catches SIGTERM on any of them and agrees
    # with all on the step at which every process saves and stops (each must ask every step):
    # one process leaving the loop alone would leave the others hung in the next collectives.
    preempted = False
    pending = None  # (step, device metrics) of the previous step, fetched one step late
    last_good = start_step or None
    tick_time, tick_step = time.perf_counter(), start_step
    summary = {}
    progress = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                    disable=jax.process_index() != 0)
    step = start_step
    try:
      for step in range(start_step + 1, total_steps + 1):
        if _DEBUG_SIGNAL_AT_STEP.value == step:
          mngr.wait_until_finished()
          os.kill(os.getpid(), getattr(signal, _DEBUG_SIGNAL.value))
        with jax.profiler.StepTraceAnnotation("train_step", step_num=step):
          x = sharding.global_batch(next(batches), mesh)
          if step == start_step + 1:
            floor_ms = measure_floor_ms(cfg, plan, state, data.device_rows(x, store.dtype))
          state, step_metrics = update(state, x)
        if pending is not None:
          summary = log_metrics(writer, progress, schedule, floor_ms, *pending, tick_time,
                                tick_step, last_good=last_good, workdir=workdir)
          tick_time, tick_step = time.perf_counter(), pending[0]
          pending = None
        if step % _LOG_EVERY.value == 0 or step == total_steps:
          if inference is not None:  # dispatched before the next step takes the state
            evaluated = inference(state, x)
            step_metrics = {**step_metrics, "inference_fvu": evaluated["fvu"],
                            "inference_l0": evaluated["l0"]}
          pending = (step, step_metrics)
        progress.update(1)
        preempted = mngr.reached_preemption(step) or bool(sigterm)
        if step % _CHECKPOINT_EVERY.value == 0 or step == total_steps or preempted:
          check_finite(step, step_metrics, last_good, workdir)  # never save a diverged state
          checkpoint.save(mngr, step, state)
          last_good = step
        if preempted:
          write_note(f"SIGTERM: saved step {step}, exiting with status {PREEMPTED_EXIT_CODE}; "
                     "rerun the same command to resume")
          break
      if pending is not None:
        summary = log_metrics(writer, progress, schedule, floor_ms, *pending, tick_time,
                              tick_step, last_good=last_good, workdir=workdir)
    finally:  # an error too leaves the checkpoints it names complete on disk
      progress.close()
      mngr.wait_until_finished()
      mngr.close()
      writer.close()
  if jax.process_index() == 0:
    print(json.dumps({"workdir": str(workdir), "step": step, "total_steps": total_steps,
                      **summary, **({"preempted": True} if preempted else {})}))
  if preempted:
    sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
  cli.run(main, (TrainError, StoreError, DictionaryError, data.DataError))
