"""The training loop: every member's jitted step on each batch, metrics one step late,
checkpoints, non-finite losses, fault injection, and preemption (SIGTERM) on one process or many.
"""

from __future__ import annotations

import os
import signal
import time

import jax
import jax.numpy as jnp
from tqdm import tqdm

from sae_jax import data, logs
from sae_jax.kernels import perf, sharding
from sae_jax.training import checkpoint
from sae_jax.config import RunConfig, SAEConfig
from sae_jax.kernels.kernel_plan import KernelPlan
from sae_jax.training.members import Member

# The status of a run stopped by SIGTERM after saving: 128 + SIGTERM, as a shell reports a process
# that SIGTERM ended, so schedulers and `&&` chains see an unfinished run.
PREEMPTED_EXIT_CODE = 143


def train(run: RunConfig, members: list[Member], batches: dict, mesh: jax.sharding.Mesh,
          plan: KernelPlan, store_dtype: str, first_step: int, total_steps: int
          ) -> tuple[int, bool]:
  """Trains every member from its start step to `total_steps`; returns (the last step, whether a
  SIGTERM stopped the run). Checkpoints it names are complete on disk even after an error."""
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
      if run.debug_signal_at_step == step:
        for m in members:
          m.mngr.wait_until_finished()
        os.kill(os.getpid(), getattr(signal, run.debug_signal))
      # A member restored at a later step than the others has already trained on this batch.
      active = [m for m in members if step > m.start_step and not m.failed]
      with jax.profiler.StepTraceAnnotation("train_step", step_num=step):
        xs = {path: sharding.global_batch(next(b), mesh) for path, b in batches.items()}
        for m in active:
          x = xs[m.init.store]
          if step == m.start_step + 1:
            m.floor_ms = measure_floor_ms(m.cfg, plan, m.state, data.device_rows(x, store_dtype))
            if step > first_step + 1:
              m.tick = (time.perf_counter(), m.start_step)
          m.state, m.step_metrics = m.update(m.state, x)
          m.nonfinite = track_nonfinite(m.nonfinite, m.step_metrics["loss"], step)
      for m in active:
        if m.pending is not None:
          m.summary = log_metrics(m, run.batch_size, *m.pending)
          m.pending = None
          show(progress, members, m.summary)
        if not m.failed and (step % run.log_every == 0 or step == total_steps):
          if m.inference is not None:  # dispatched before the next step takes the state
            evaluated = m.inference(m.state, xs[m.init.store])
            m.step_metrics = {**m.step_metrics, "inference_fvu": evaluated["fvu"],
                              "inference_l0": evaluated["l0"]}
          m.pending = (step, m.step_metrics, m.nonfinite)
      progress.update(1)
      preempted = members[0].mngr.reached_preemption(step) or bool(sigterm)
      if step % run.checkpoint_every == 0 or step == total_steps or preempted:
        for m in active:  # never save a diverged state
          if not m.failed and check_finite(m, m.nonfinite):
            checkpoint.save(m.mngr, step, m.state, batches[m.init.store])
            m.last_good = step
      if preempted:
        logs.note(f"SIGTERM: saved step {step}, exiting with status {PREEMPTED_EXIT_CODE}; "
                  "rerun the same command to resume")
        break
      if all(m.failed for m in members):
        break
    for m in members:
      if m.pending is not None:
        m.summary = log_metrics(m, run.batch_size, *m.pending)
        show(progress, members, m.summary)
  finally:  # an error too leaves the checkpoints it names complete on disk
    progress.close()
    for m in members:
      m.mngr.wait_until_finished()
      m.mngr.close()
      m.writer.close()
  return step, preempted


@jax.jit
def _first_nonfinite(first_step, first_loss, loss, step):
  new = (first_step < 0) & ~jnp.isfinite(loss)
  return jnp.where(new, step, first_step), jnp.where(new, loss, first_loss)


def track_nonfinite(nonfinite: tuple | None, loss: jax.Array, step: int) -> tuple:
  """The member's (first step with a non-finite loss or -1, its loss) after `step`, on the device
  (dispatched, never waited for)."""
  first_step, first_loss = nonfinite or (-1, 0.0)
  return _first_nonfinite(first_step, first_loss, loss, step)


def check_finite(m: Member, nonfinite: tuple) -> bool:
  """Whether every loss so far was finite (`nonfinite`: track_nonfinite's record as of some
  step). If not, the member stops at the first bad step: a single run with an error; a sweep
  member keeps its last good checkpoint while the others go on, and the sweep ends with its
  error."""
  first_step, first_loss = jax.device_get(nonfinite)
  if first_step < 0:
    return True
  saved = (f"step {m.last_good} in {m.workdir / 'checkpoints'}" if m.last_good else
           "none (no checkpoint was saved)")
  error = m.error(f"loss is {float(first_loss)} at step {int(first_step)}; the last good "
                  f"checkpoint is {saved}")
  if m.name is None:
    raise error
  m.failed = str(error)
  logs.note(f"{error}; the other members go on")
  return False


def log_metrics(m: Member, batch_size: int, step: int, device_metrics: dict,
                nonfinite: tuple) -> dict:
  """Fetches a step's metrics (already computed: this runs one step late), stops the member if a
  loss so far was not finite, and writes them."""
  scalars = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
  if not check_finite(m, nonfinite):
    return m.summary
  scalars = m.cfg.arch.loggable(scalars)
  scalars["lr"] = float(m.schedule(step - 1))  # the rate that step's update used
  since_time, since_step = m.tick
  elapsed = time.perf_counter() - since_time
  scalars["tokens_per_s"] = (step - since_step) * batch_size / max(elapsed, 1e-9)
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
