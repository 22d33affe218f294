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

A sweep trains several SAEs on one pass over the data (sae_jax.sweep): each `--sae='--k=16 ...'`
(or line of `--sweep=FILE`) is one member, the command line with that member's overrides of the
flags in SWEEP_FLAGS, trained in WORKDIR/<name> exactly as a run of those flags alone would be:
its own jitted step, state, schedule, checkpoints and metrics. Every batch is read once, and
members on other stores (other layers of one harvest) get the same rows of theirs, read in
lockstep. A resume restores each member's own latest checkpoint and starts at the earliest. A
member whose loss is not finite stops (its last good checkpoint stays) while the others go on;
the sweep then ends with the error. A sweep prints one summary line per member (with "name"),
then one of its own ({"workdir", "members", "step", "total_steps"}).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from absl import flags, logging
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from sae_jax import (checkpoint, cli, data, dictionary, distributed, logs, perf, sharded, sharding,
                     sweep)
from sae_jax.dictionary import DictionaryError
from sae_jax.kernel_plan import KernelPlan
from sae_jax.metrics import MetricWriter
from sae_jax.model import ARCHITECTURES, SAEConfig, geometric_median
from sae_jax.programs import jit_inference, jit_update
from sae_jax.step import create_state, default_learning_rate, make_optimizer
from sae_jax.store import Store, StoreError, absolute, atomic_write_json

# Data.
_STORE = flags.DEFINE_string("store", None, "Activation store to train on (required, here or in "
                             "every --sae/--sweep spec).")
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
    "per_shard = AuxK reconstructs with each shard's own top dead latents (k_aux // m, one more "
    "on the first k_aux % m shards), no candidates cross chips; exact = the global top k_aux dead latents, an all-gather of "
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
# Sweeps.
_ACCEPT_KERNEL_PLAN = flags.DEFINE_bool(
    "accept_kernel_plan", False, "Resume although this start's kernel plan (native C++ or XLA "
    "kernels, for the devices) differs from the one the run was trained with: the kernels agree "
    "only to allclose, so the resumed run is not bit-identical to an uninterrupted one.")
_SAE = flags.DEFINE_multi_string(
    "sae", [], "One SAE of a sweep, as flags that override the command line's for it, e.g. "
    "--sae='--k=16 --lr=1e-3 --name=k16'; repeat for more. Only the flags in SWEEP_FLAGS.")
_SWEEP = flags.DEFINE_string("sweep", None, "A file of --sae specs, one per non-blank, non-# line.")

# What a --sae/--sweep spec may set: what one SAE computes from the batches that every member of
# the sweep shares (the data order, batch size, steps and seed are the sweep's).
SWEEP_FLAGS = (
    "store", "normalize_inputs", "init_sample_rows",
    "expansion_factor", "num_latents", "k", "multi_topk", "auxk_alpha", "dead_tokens", "k_aux",
    "shard_capacity", "auxk_select", "b_dec_init", "init_from", "compute_dtype", "topk",
    "topk_recall", "weight_grads", "architecture", "batchtopk_max_k", "threshold_beta",
    "threshold_start_step", "matryoshka_prefixes",
    "lr", "lr_warmup_steps", "lr_decay", "adam_b1", "adam_b2", "adam_eps", "grad_clip")

# What a resumed run may change: how long it runs and how it is carried out, not what it computes.
# Changing --steps/--epochs is also refused when the learning-rate schedule depends on the total.
RESUMABLE_FLAGS = frozenset({
    "workdir", "steps", "epochs", "checkpoint_every", "keep_checkpoints", "log_every",
    "read_threads", "prefetch_batches", "mesh", "distributed", "coordinator_address",
    "num_processes", "process_id", "debug_signal_at_step", "debug_signal", "accept_kernel_plan"})


# The status of a run stopped by SIGTERM after saving: 128 + SIGTERM, as a shell reports a process
# that SIGTERM ended, so schedulers and `&&` chains see an unfinished run.
PREEMPTED_EXIT_CODE = 143


class TrainError(Exception):
  """A run that cannot go on (bad flags, a resume that would change the run, a non-finite loss);
  reported as one line."""


@dataclasses.dataclass
class Member:
  """One SAE that the run trains: its workdir and flags, then everything it trains with."""
  name: str | None  # None: a single run (no --sae/--sweep)
  workdir: Path
  flags: dict  # resolved, as its flags.json records them
  run: dict | None = None  # run.json of an earlier start
  old_flags: dict | None = None  # flags.json of an earlier start
  input_scale: float = 1.0
  init_params: dict | None = None
  cfg: SAEConfig | None = None
  peak_lr: float = 0.0
  schedule: optax.Schedule | None = None
  tx: optax.GradientTransformation | None = None
  state: Any = None
  update: Any = None  # the jitted step
  inference: Any = None  # batchtopk: the jitted JumpReLU metrics at the learned threshold
  mngr: Any = None
  writer: MetricWriter | None = None
  start_step: int = 0
  last_good: int | None = None
  floor_ms: float = 0.0
  tick: tuple[float, int] = (0.0, 0)  # (time, step) that tokens_per_s counts from
  step_metrics: Any = None
  pending: tuple | None = None  # (step, device metrics), fetched one step late
  summary: dict = dataclasses.field(default_factory=dict)
  failed: str | None = None  # the error of a sweep member stopped by a non-finite loss

  def error(self, message: str) -> TrainError:
    return TrainError(message if self.name is None else f"sweep member {self.name}: {message}")


def resolved_flags(overrides: dict | None = None, workdir: Path | None = None) -> dict:
  """This module's flags as flags.json records them (JSON types, paths absolute); a sweep
  member's with its overrides and workdir."""
  values = {h.name: h.value for h in globals().values()
            if isinstance(h, flags.FlagHolder) and h.name not in ("sae", "sweep")}
  values.update(overrides or {})
  if workdir is not None:
    values["workdir"] = str(workdir)
  for name in ("store", "init_from"):
    if values[name]:
      values[name] = absolute(values[name])
  return json.loads(json.dumps(values))


def sae_config(v: dict, d_in: int, num_latents: int) -> SAEConfig:
  """The SAE of a member's flags `v`."""
  return SAEConfig(d_in=d_in, num_latents=num_latents, k=v["k"], multi_topk=v["multi_topk"],
                   auxk_alpha=v["auxk_alpha"], dead_tokens=v["dead_tokens"],
                   k_aux=v["k_aux"] or None, shard_capacity=v["shard_capacity"],
                   auxk_select=v["auxk_select"], compute_dtype=v["compute_dtype"],
                   topk=v["topk"], topk_recall=v["topk_recall"],
                   weight_grads=v["weight_grads"], architecture=v["architecture"],
                   batchtopk_max_k=v["batchtopk_max_k"], threshold_beta=v["threshold_beta"],
                   threshold_start_step=v["threshold_start_step"],
                   matryoshka_prefixes=tuple(map(int, v["matryoshka_prefixes"])))


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


def check_resumed_plan(m: Member, plan: KernelPlan) -> None:
  """Refuses a resume whose kernel plan differs from the one recorded, unless accepted."""
  old = (m.old_flags or {}).get("resolved", {}).get("kernel_plan")
  if old is None or old == plan.to_json() or _ACCEPT_KERNEL_PLAN.value:
    return
  changed = ", ".join(f"{k} {old.get(k)} -> {v}" for k, v in plan.to_json().items()
                      if old.get(k) != v)
  raise m.error(f"the run in {m.workdir} was trained with other kernels ({changed}; "
                "SAE_JAX_NATIVE, a C++ compiler and the devices decide them), which agree only "
                "to allclose; resume where they match, or pass --accept_kernel_plan to go on "
                "with these")


def check_resumed_total(m: Member, new_total: int) -> None:
  """Refuses a new total step count where the learning-rate schedule depends on it: a decay, or a
  warmup that the old total cut short."""
  old_total = m.old_flags["resolved"]["total_steps"]
  warmup, decay = m.flags["lr_warmup_steps"], m.flags["lr_decay"]
  if new_total != old_total and (decay != "constant" or
                                 min(warmup, old_total) != min(warmup, new_total)):
    raise TrainError(f"--steps/--epochs give {new_total} steps but the run in {m.workdir} has "
                     f"{old_total}, and its learning rate (--lr_decay={decay}, "
                     f"--lr_warmup_steps={warmup}) depends on the total; use a new --workdir")


def check_finite(m: Member, step: int, metrics: dict) -> bool:
  """Whether the loss is finite. If not, the member stops: a single run with an error; a sweep
  member keeps its last good checkpoint while the others go on, and the sweep ends with its
  error."""
  loss = float(metrics["loss"])
  if math.isfinite(loss):
    return True
  saved = (f"step {m.last_good} in {m.workdir / 'checkpoints'}" if m.last_good else
           "none (no checkpoint was saved)")
  error = m.error(f"loss is {loss} at step {step}; the last good checkpoint is {saved}")
  if m.name is None:
    raise error
  m.failed = str(error)
  write_note(f"{error}; the other members go on")
  return False


def write_note(note: str) -> None:
  if jax.process_index() == 0:
    logging.info("NOTE: %s", note)


def sweep_members(workdir: Path) -> tuple[list[sweep.Member], list[Member]]:
  """What to train: the command line's SAE in WORKDIR, or one per --sae/--sweep spec in
  WORKDIR/<name>; each with its earlier start, checked against what a resume may change."""
  try:
    specs = sweep.read_specs(_SAE.value, _SWEEP.value, SWEEP_FLAGS, flags.FLAGS)
    if specs:
      sweep.check_resumed(workdir, specs)
  except sweep.SweepError as e:
    raise TrainError(str(e)) from e
  if not specs and (workdir / sweep.SWEEP_FILE).exists():
    raise TrainError(f"{workdir} holds a sweep ({sweep.SWEEP_FILE}); rerun it with its "
                     "--sae/--sweep specs, or use a new --workdir")
  if specs and checkpoint.read_run(workdir) is not None:
    raise TrainError(f"{workdir} holds a single run; a sweep needs a new --workdir")
  members = ([Member(s.name, workdir / s.name, resolved_flags(s.overrides, workdir / s.name))
              for s in specs] or [Member(None, workdir, resolved_flags())])
  for m in members:
    if not m.flags["store"]:
      raise m.error("--store is required (on the command line, or in every --sae/--sweep spec)")
    m.run = checkpoint.read_run(m.workdir)
    m.old_flags = checkpoint.read_flags(m.workdir) if m.run is not None else None
    if m.old_flags is not None:
      check_resumed_flags(m.workdir, m.old_flags, m.flags)
  return specs, members


def jumprelu_init(m: Member, params: dict) -> dict:
  """A JumpReLU export's parameters as a member starts from them: a BatchTopK SAE takes its
  threshold (one value for every latent, as BatchTopK learns it); a TopK SAE has none to take."""
  params = dict(params)
  thresholds = params.pop(dictionary.THRESHOLD)
  source = f"--init_from={m.flags['init_from']}"
  if m.cfg.architecture != "batchtopk":
    write_note(f"{source} is a JumpReLU; --architecture={m.cfg.architecture} trains without its "
               "threshold")
    return params
  if np.any(thresholds != thresholds[0]):
    raise m.error(f"{source} has per-latent thresholds ({thresholds.min():.4g} to "
                  f"{thresholds.max():.4g}); a BatchTopK SAE learns one for all latents")
  return {**params, "threshold": thresholds[0]}


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


def state_initializer(cfg: SAEConfig, tx: optax.GradientTransformation, plan: KernelPlan, *,
                      b_dec, init_params: dict | None):
  """A traceable () -> state (jitted with out_shardings, the state is born sharded), and a list
  that receives the state's graphdef when it is traced."""
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

  return init_state, graphdef_box


def log_metrics(m: Member, step: int, device_metrics: dict) -> dict:
  """Fetches a step's metrics (already computed: this runs one step late), stops the member if the
  loss is not finite, and writes them."""
  scalars = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
  if not check_finite(m, step, scalars):
    return m.summary
  if scalars.get("threshold", 0.0) < 0:  # BatchTopK before its threshold is learned: no JumpReLU
    scalars.pop("inference_fvu", None)
    scalars.pop("inference_l0", None)
  scalars["lr"] = float(m.schedule(step - 1))  # the rate that step's update used
  since_time, since_step = m.tick
  elapsed = time.perf_counter() - since_time
  scalars["tokens_per_s"] = (step - since_step) * _BATCH_SIZE.value / max(elapsed, 1e-9)
  scalars["floor_fraction"] = m.floor_ms * 1e-3 * (step - since_step) / max(elapsed, 1e-9)
  m.writer.write(step, scalars)
  m.tick = (time.perf_counter(), step)
  return scalars


def show(progress: tqdm, members: list[Member], scalars: dict) -> None:
  """The progress bar's postfix: a single run's metrics, or a sweep's size and tokens/s per SAE."""
  if members[0].name is None:
    progress.set_postfix(fvu=f"{scalars['fvu']:.4f}", dead=f"{scalars['dead_fraction']:.3f}",
                         tok_s=f"{scalars['tokens_per_s']:.3g}", refresh=False)
  elif "tokens_per_s" in scalars:
    progress.set_postfix(saes=len(members), tok_s=f"{scalars['tokens_per_s']:.3g}", refresh=False)


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
  specs, members = sweep_members(workdir)
  is_sweep = bool(specs)
  for m in members:
    m.workdir.mkdir(parents=True, exist_ok=True)

  ##############################################################################################
  # Input: the stores, the number of steps, the input scales.                                  #
  ##############################################################################################
  # One reader per distinct store; they have the same rows and are read in the same order, in
  # lockstep, each batch once for all the members that train on it.
  token_kinds = _TOKEN_KINDS.value or None
  readers = {}
  for m in members:
    if m.flags["store"] not in readers:
      readers[m.flags["store"]] = data.ChunkReader(
          Store(m.flags["store"]), token_kinds, chunk_bytes=_READ_CHUNK_KB.value << 10,
          read_threads=_READ_THREADS.value)
  rows, *others = readers.values()
  for other in others:
    data.check_lockstep(rows, other)
  store = rows.store
  d_in = store.d_model
  if rows.num_rows < _BATCH_SIZE.value:
    raise StoreError(f"{store.path} has {rows.num_rows} selected rows, fewer than one batch "
                     f"(--batch_size={_BATCH_SIZE.value})")
  # Fixed at the first start (flags.json), so that a resume may use another number of processes.
  old_flags = next((m.old_flags for m in members if m.old_flags is not None), None)
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
  samples = {}  # (store, rows) -> the rows sampled for the input scale and b_dec, shared

  def sample(m: Member) -> np.ndarray:
    key = (m.flags["store"], m.flags["init_sample_rows"])
    if key not in samples:
      samples[key] = data.sample_rows(readers[key[0]], key[1], seed=_SEED.value)
    return samples[key]

  for m in members:
    if m.old_flags is not None:
      check_resumed_total(m, total_steps)
    if m.run is not None:
      m.input_scale = m.run["input_scale"]
    elif m.flags["normalize_inputs"]:
      m.input_scale = float(np.sqrt(d_in / np.mean(np.sum(sample(m).astype(np.float64) ** 2,
                                                          axis=1))))

  ##############################################################################################
  # Models and optimizers.                                                                     #
  ##############################################################################################
  for m in members:
    v, init_info = m.flags, None
    if v["init_from"]:
      m.init_params, init_info = dictionary.read(v["init_from"])
      if init_info["d_in"] != d_in:
        raise StoreError(f"--init_from={v['init_from']} has d_in={init_info['d_in']} but "
                         f"--store={v['store']} has d_model={d_in}")
      # An export acts on raw activations; the trainer sees scale * x: undo the export's folding.
      m.init_params = dictionary.fold_input_scale(m.init_params, 1 / m.input_scale)
    num_latents = (init_info["num_latents"] if init_info else
                   v["num_latents"] or v["expansion_factor"] * d_in)
    if v["k"] > num_latents:
      raise m.error(f"--k={v['k']} exceeds the number of latents ({num_latents})")
    if not all(w.isdigit() for w in v["matryoshka_prefixes"]):
      raise m.error(f"--matryoshka_prefixes={','.join(v['matryoshka_prefixes'])}: expected "
                    "comma-separated latent counts")
    try:
      m.cfg = sae_config(v, d_in, num_latents)
    except ValueError as e:  # each message starts with the flag's name
      raise m.error(f"--{e}") from e
    if m.init_params is not None and dictionary.THRESHOLD in m.init_params:
      m.init_params = jumprelu_init(m, m.init_params)
    if m.run is not None and SAEConfig(**m.run["sae"]) != m.cfg:
      raise TrainError(f"{m.workdir} holds a run with another SAE config ({m.run['sae']}); "
                       "use a new --workdir")
    m.peak_lr = v["lr"] or default_learning_rate(num_latents)
    m.schedule = lr_schedule(m.peak_lr, v["lr_warmup_steps"], total_steps, v["lr_decay"])
    m.tx = make_optimizer(m.schedule, b1=v["adam_b1"], b2=v["adam_b2"], eps=v["adam_eps"],
                          grad_clip=v["grad_clip"] or None)

  ##############################################################################################
  # Mesh, shardings and the initial states (born sharded, never whole on one device).          #
  ##############################################################################################
  try:
    mesh = sharding.make_mesh(_MESH.value)
  except ValueError as e:  # the message names --mesh
    raise TrainError(str(e)) from e
  data_shards = mesh.shape["data"]
  if _BATCH_SIZE.value % data_shards:
    raise TrainError(f"--batch_size={_BATCH_SIZE.value} must be divisible by the data axis of "
                     f"the mesh ({data_shards})")
  # The kernels for the devices the step is compiled for; `bench --aot_topology` plans the same.
  plan = KernelPlan.for_devices(mesh.devices.flat)
  for m in members:
    check_resumed_plan(m, plan)
  if is_sweep and jax.process_index() == 0:
    sweep.write(workdir, specs)
  for m in members:
    if m.cfg.num_latents % mesh.shape["model"]:
      raise m.error(f"num_latents={m.cfg.num_latents} must be divisible by the model axis of "
                    f"the mesh ({mesh.shape['model']})")
    if jax.process_index() == 0:
      atomic_write_json(m.workdir / checkpoint.FLAGS_FILE, {
          **m.flags, "resolved": {"num_latents": m.cfg.num_latents, "lr": m.peak_lr,
                                  "total_steps": total_steps, "steps_per_epoch": per_epoch,
                                  "input_scale": m.input_scale, "kernel_plan": plan.to_json(),
                                  "data_lanes": data_lanes}})
  write_note(f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} "
             f"devices, {jax.process_count()} process(es); {total_steps} steps of "
             f"{_BATCH_SIZE.value} tokens" + (f", {len(members)} SAEs on {len(readers)} store(s)"
                                              if is_sweep else "") + f"; kernels {plan}")

  def b_dec_init(m: Member):
    if m.init_params is not None:
      return None
    if m.flags["b_dec_init"] == "zeros":
      return jnp.zeros((d_in,), jnp.float32)
    scaled = m.input_scale * sample(m)
    return geometric_median(scaled) if m.flags["b_dec_init"] == "median" else jnp.asarray(
        scaled.mean(0))

  with jax.set_mesh(mesh):
    for m in members:
      m.mngr = checkpoint.manager(m.workdir, keep=_KEEP_CHECKPOINTS.value,
                                  barrier_prefix=m.name and f"sweep_{m.name}_")
      m.start_step = m.mngr.latest_step() or 0
      init_state, graphdef_box = state_initializer(
          m.cfg, m.tx, plan, b_dec=None if m.start_step else b_dec_init(m),
          init_params=m.init_params)
      abstract_state = jax.eval_shape(init_state)
      state_sharding = sharding.state_shardings(abstract_state, mesh)
      if m.start_step:
        write_note(f"resuming from step {m.start_step} of {m.workdir}")
        m.state = checkpoint.restore(m.mngr, m.start_step, abstract_state, state_sharding)
      else:
        m.state = jax.jit(init_state, out_shardings=state_sharding)()
        if jax.process_index() == 0:
          manifest = readers[m.flags["store"]].store.manifest
          checkpoint.write_run(m.workdir, cfg=m.cfg, input_scale=m.input_scale, source={
              "store": m.flags["store"], "model": manifest["model"],
              "hookpoint": manifest["hookpoint"], "layer": manifest["layer"],
              "token_kinds": token_kinds, "init_from": m.flags["init_from"]})
      # Each member's own step, so that it computes exactly what a run of its flags alone would.
      m.update = jit_update(graphdef_box[0], m.input_scale, store.dtype, state_sharding, mesh)
      if m.cfg.architecture == "batchtopk":  # the JumpReLU at the learned threshold, at log steps
        m.inference = jit_inference(graphdef_box[0], m.input_scale, store.dtype, state_sharding,
                                    mesh)
    samples.clear()

    ############################################################################################
    # Data, from the earliest restored step: every store in the same order.                    #
    ############################################################################################
    try:
      orders = data.lane_orders(
          rows, lanes=data_lanes, buffer_bytes=_SHUFFLE_BUFFER_MB.value << 20, seed=_SEED.value,
          process_index=jax.process_index(), process_count=jax.process_count())
    except ValueError as e:
      raise TrainError(f"--store={store.path}, --read_chunk_kb={_READ_CHUNK_KB.value}, "
                       f"--data_lanes={data_lanes}: {e}") from e
    first_step = min(m.start_step for m in members)
    batches = {path: data.batches(reader, orders, batch_rows=_BATCH_SIZE.value //
                                  jax.process_count(), start_step=first_step,
                                  prefetch_batches=_PREFETCH_BATCHES.value)
               for path, reader in readers.items()}
    for m in [m for m in members if first_step and m.start_step == first_step][:1]:
      b = batches[m.flags["store"]]  # grain's position saved with the step: the order's for it
      expected = b.get_state()
      if checkpoint.restore_data(m.mngr, first_step, b) and b.get_state() != expected:
        raise TrainError(f"--workdir={m.workdir}: the data position saved with step "
                         f"{first_step} is not where the data order puts that step: the store "
                         "or the order changed since it was saved; train in a new --workdir")

    ############################################################################################
    # The loop.                                                                                 #
    ############################################################################################
    for m in members:
      m.writer = MetricWriter(m.workdir, resume_step=m.start_step,
                              enabled=jax.process_index() == 0)
      m.last_good = m.start_step or None
    sigterm = []
    if jax.process_count() == 1:
      signal.signal(signal.SIGTERM, lambda *_: sigterm.append(True))
    # With several processes, JAX's preemption service catches SIGTERM on any of them and agrees
    # with all on the step at which every process saves and stops (each must ask every step):
    # one process leaving the loop alone would leave the others hung in the next collectives.
    preempted = False
    for m in members:
      m.tick = (time.perf_counter(), m.start_step)
    progress = tqdm(total=total_steps, initial=first_step, unit="step", dynamic_ncols=True,
                    disable=jax.process_index() != 0)
    step = first_step
    try:
      for step in range(first_step + 1, total_steps + 1):
        if _DEBUG_SIGNAL_AT_STEP.value == step:
          for m in members:
            m.mngr.wait_until_finished()
          os.kill(os.getpid(), getattr(signal, _DEBUG_SIGNAL.value))
        # A member restored at a later step than the others has already trained on this batch.
        active = [m for m in members if step > m.start_step and not m.failed]
        with jax.profiler.StepTraceAnnotation("train_step", step_num=step):
          xs = {path: sharding.global_batch(next(b), mesh) for path, b in batches.items()}
          for m in active:
            x = xs[m.flags["store"]]
            if step == m.start_step + 1:
              m.floor_ms = measure_floor_ms(m.cfg, plan, m.state, data.device_rows(x, store.dtype))
              if step > first_step + 1:
                m.tick = (time.perf_counter(), m.start_step)
            m.state, m.step_metrics = m.update(m.state, x)
        for m in active:
          if m.pending is not None:
            m.summary = log_metrics(m, *m.pending)
            m.pending = None
            show(progress, members, m.summary)
          if not m.failed and (step % _LOG_EVERY.value == 0 or step == total_steps):
            if m.inference is not None:  # dispatched before the next step takes the state
              evaluated = m.inference(m.state, xs[m.flags["store"]])
              m.step_metrics = {**m.step_metrics, "inference_fvu": evaluated["fvu"],
                                "inference_l0": evaluated["l0"]}
            m.pending = (step, m.step_metrics)
        progress.update(1)
        preempted = members[0].mngr.reached_preemption(step) or bool(sigterm)
        if step % _CHECKPOINT_EVERY.value == 0 or step == total_steps or preempted:
          for m in active:  # never save a diverged state
            if not m.failed and check_finite(m, step, m.step_metrics):
              checkpoint.save(m.mngr, step, m.state, batches[m.flags["store"]])
              m.last_good = step
        if preempted:
          write_note(f"SIGTERM: saved step {step}, exiting with status {PREEMPTED_EXIT_CODE}; "
                     "rerun the same command to resume")
          break
        if all(m.failed for m in members):
          break
      for m in members:
        if m.pending is not None:
          m.summary = log_metrics(m, *m.pending)
          show(progress, members, m.summary)
    finally:  # an error too leaves the checkpoints it names complete on disk
      progress.close()
      for m in members:
        m.mngr.wait_until_finished()
        m.mngr.close()
        m.writer.close()
  if jax.process_index() == 0:
    # One line per member of a sweep, then the sweep's: a single run prints just its own.
    for m in members:
      line = ({"ok": False, "error": m.failed, "last_good_step": m.last_good} if m.failed else
              {"step": step, "total_steps": total_steps, **m.summary})
      print(json.dumps({**({"name": m.name} if is_sweep else {}), "workdir": str(m.workdir),
                        **line, **({"preempted": True} if preempted else {})}))
  failed = [m.failed for m in members if m.failed]
  if failed:
    raise TrainError(" | ".join(failed))
  if is_sweep and jax.process_index() == 0:
    print(json.dumps({"workdir": str(workdir), "members": [m.name for m in members],
                      "step": step, "total_steps": total_steps,
                      **({"preempted": True} if preempted else {})}))
  if preempted:
    sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
  cli.run(main, (TrainError, StoreError, DictionaryError, data.DataError))
