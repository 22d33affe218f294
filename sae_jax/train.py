r"""Trains a sparse autoencoder (any registered architecture) on an activation store.

  python -m sae_jax.train --store=STORE --workdir=WORKDIR --k=32 --expansion_factor=16
  python -m sae_jax.train --flagfile=launch/configs/tiny_cpu.flags

Rerunning the same command resumes from the latest checkpoint in --workdir, exactly: the result is
bit-identical to a run that was never interrupted (same data order, same state). Only the flags in
config.RESUMABLE_FLAGS may change on resume. SIGTERM (a preemption notice) saves a checkpoint and exits
with status 143 (PREEMPTED_EXIT_CODE), so that `train && export` never exports half a run; with
several processes, every process saves the same step (JAX's preemption sync, through orbax) and
exits. The resolved flags go to WORKDIR/flags.json, metrics to WORKDIR/metrics.jsonl and
WORKDIR/tb/, and a one-line JSON summary is printed last ("preempted": true when stopped so); a
run stopped by its inputs or a non-finite loss prints {"ok": false, "error": ...} instead and
exits with status 1.

A sweep trains several SAEs on one pass over the data (sae_jax.training.sweep): each
`--sae='--k=16 ...'` (or line of `--sweep=FILE`) is one member, the command line with that member's
overrides of the flags in config.SWEEP_FLAGS, trained in WORKDIR/<name> exactly as a run of those
flags alone would be: its own jitted step, state, schedule, checkpoints and metrics. Every batch is
read once, and members on other stores (other layers of one harvest) get the same rows of theirs,
read in lockstep. A resume restores each member's own latest checkpoint and starts at the earliest.
A member whose loss is not finite stops (its last good checkpoint stays) while the others go on; the
sweep then ends with the error. A sweep prints one summary line per member (with "name"), then one
of its own ({"workdir", "members", "step", "total_steps"}).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import flags
import jax

from sae_jax import cli, config, data, logs
from sae_jax.training import distributed, sweep
from sae_jax.config import RunConfig
from sae_jax.formats.dictionary import DictionaryError
from sae_jax.store import StoreError
from sae_jax.training import loop, setup
from sae_jax.training.loop import PREEMPTED_EXIT_CODE
from sae_jax.training.members import TrainError, read_members

# Every knob (config.py), then the sweep's specs.
config.define_flags(RunConfig, *config.MEMBER_CONFIGS)
flags.adopt_module_key_flags(config)  # so that --help lists them as this command's
_SAE = flags.DEFINE_multi_string(
    "sae", [], "One SAE of a sweep, as flags that override the command line's for it, e.g. "
    "--sae='--k=16 --lr=1e-3 --name=k16'; repeat for more. Only the flags in "
    "config.SWEEP_FLAGS.")
_SWEEP = flags.DEFINE_string("sweep", None, "A file of --sae specs, one per non-blank, non-# line.")


def main() -> None:
  logs.quiet_libraries()
  run = config.build(RunConfig, config.flag_values(RunConfig))
  distributed.initialize(run.distributed, run.coordinator_address, run.num_processes,
                         run.process_id)
  workdir = Path(run.workdir)
  specs, members = read_members(workdir, config.flag_values(RunConfig, *config.MEMBER_CONFIGS),
                                _SAE.value, _SWEEP.value)
  for m in members:
    m.workdir.mkdir(parents=True, exist_ok=True)

  # Input: the stores (read in lockstep), the number of steps, the input scales.
  inp = setup.open_input(run, members)
  # Models and optimizers.
  setup.build_models(members, inp)
  # Mesh and kernels; what each member resolved to goes to its flags.json.
  mesh, plan = setup.make_mesh(run, members)
  if specs and jax.process_index() == 0:
    sweep.write(workdir, specs)
  setup.record_flags(members, inp, plan)
  logs.note(f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} "
            f"devices, {jax.process_count()} process(es); {inp.total_steps} steps of "
            f"{run.batch_size} tokens" + (f", {len(members)} SAEs on {len(inp.readers)} store(s)"
                                          if specs else "") + f"; kernels {plan}")
  with jax.set_mesh(mesh):
    # The states (born sharded, or restored) and their jitted steps; data from the earliest step.
    first_step = setup.init_states(run, members, inp, mesh, plan)
    batches = setup.open_batches(run, inp, first_step)
    setup.check_data_position(members, batches, first_step)
    # The loop.
    step, preempted = loop.train(run, members, batches, mesh, plan, inp.store.dtype, first_step,
                                 inp.total_steps)

  if jax.process_index() == 0:
    # One line per member of a sweep, then the sweep's: a single run prints just its own.
    for m in members:
      line = ({"ok": False, "error": m.failed, "last_good_step": m.last_good} if m.failed else
              {"step": step, "total_steps": inp.total_steps, **m.summary})
      print(json.dumps({**({"name": m.name} if specs else {}), "workdir": str(m.workdir),
                        **line, **({"preempted": True} if preempted else {})}))
  failed = [m.failed for m in members if m.failed]
  if failed:
    raise TrainError(" | ".join(failed))
  if specs and jax.process_index() == 0:
    print(json.dumps({"workdir": str(workdir), "members": [m.name for m in members],
                      "step": step, "total_steps": inp.total_steps,
                      **({"preempted": True} if preempted else {})}))
  if preempted:
    sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
  cli.run(main, (TrainError, StoreError, DictionaryError, data.DataError))
