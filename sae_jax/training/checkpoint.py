"""orbax checkpoints of the training state, and the run record that says how to rebuild it.

A workdir holds:
  run.json         the SAE config, input scale and data provenance (written once, at the start)
  flags.json       the resolved flags of the latest start (secrets never reach it)
  checkpoints/N/   orbax: items "model" (the SparseAutoencoder state: parameters and dead-latent counters)
                   and "optimizer" (Adam moments and step), saved asynchronously, and "data":
                   grain's iterator state of the input pipeline after N batches (sae_jax.data;
                   grain's own orbax handler, one JSON file a process)
The state is `nnx.split((model, optimizer))`, so state[0] is the model and state[1] the optimizer.
Saving them as separate items lets `export` and `scan` restore the model without the optimizer.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx

from sae_jax.kernels import sharding
from sae_jax.config import SAEConfig
from sae_jax.model import SparseAutoencoder
from sae_jax.files import atomic_write_json

RUN_FILE = "run.json"
FLAGS_FILE = "flags.json"


def manager(workdir: str | Path, *, keep: int, barrier_prefix: str | None = None
            ) -> ocp.CheckpointManager:
  """Async saves, the latest `keep` kept. When to save is the trainer's call (`save` forces).
  Managers that save at the same steps in one multi-process job (a sweep's members) each need a
  `barrier_prefix` of their own: orbax names its cross-process barriers by the step alone."""
  return ocp.CheckpointManager(
      Path(workdir).absolute() / "checkpoints",
      options=ocp.CheckpointManagerOptions(
          max_to_keep=keep, enable_async_checkpointing=True,
          multiprocessing_options=ocp.options.MultiprocessingOptions(
              barrier_sync_key_prefix=barrier_prefix)))


def save(mngr: ocp.CheckpointManager, step: int, state: nnx.State,
         data: grain.DatasetIterator | None = None) -> bool:
  """Saves `state`, and the position of the input pipeline `data` (after `step` batches)."""
  items = {"model": ocp.args.StandardSave(state[0]), "optimizer": ocp.args.StandardSave(state[1])}
  if data is not None:
    items["data"] = grain.checkpoint.CheckpointSave(data)
  return mngr.save(step, force=True, args=ocp.args.Composite(**items))


def restore_data(mngr: ocp.CheckpointManager, step: int, data: grain.DatasetIterator) -> bool:
  """Sets the input pipeline `data` to the position saved with `step`; False if that checkpoint
  has none (saved before the "data" item existed)."""
  if not (Path(mngr.directory) / str(step) / "data").is_dir():
    return False
  mngr.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(data)))
  return True


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: nnx.State,
            shardings) -> nnx.State:
  """Restores onto the shardings given (any mesh shape, not necessarily the one that saved)."""
  target = sharding.with_shardings(abstract_state, shardings)
  restored = mngr.restore(step, args=ocp.args.Composite(
      model=ocp.args.StandardRestore(target[0]), optimizer=ocp.args.StandardRestore(target[1])))
  state = abstract_state
  state[0], state[1] = restored["model"], restored["optimizer"]
  return state


def write_run(workdir: str | Path, *, cfg: SAEConfig, input_scale: float, source: dict) -> None:
  atomic_write_json(Path(workdir) / RUN_FILE, {
      "sae": dataclasses.asdict(cfg), "input_scale": input_scale, "source": source})


def read_run(workdir: str | Path) -> dict | None:
  path = Path(workdir) / RUN_FILE
  return json.loads(path.read_text()) if path.exists() else None


def read_flags(workdir: str | Path) -> dict | None:
  """The flags of the workdir's latest start (what a resumed run must agree with)."""
  path = Path(workdir) / FLAGS_FILE
  return json.loads(path.read_text()) if path.exists() else None


def load_model(workdir: str | Path, step: int | None = None) -> tuple[SparseAutoencoder, dict, int]:
  """The trained model of a workdir (latest checkpoint unless `step`), its run record, its step."""
  run = read_run(workdir)
  if run is None:
    raise FileNotFoundError(f"{workdir} is not a training workdir: {RUN_FILE} is missing")
  cfg = SAEConfig.from_record(run["sae"])
  # Nothing is saved through it; read_only=True would only add orbax's warnings to every export.
  mngr = ocp.CheckpointManager(Path(workdir).absolute() / "checkpoints",
                               options=ocp.CheckpointManagerOptions(create=False))
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"{workdir} has no checkpoint yet")
  abstract_model = nnx.eval_shape(lambda: SparseAutoencoder(cfg, rngs=nnx.Rngs(0)))
  graphdef, abstract = nnx.split(abstract_model)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
  restored = mngr.restore(step, args=ocp.args.Composite(model=ocp.args.StandardRestore(target)))
  mngr.close()
  return nnx.merge(graphdef, restored["model"]), run, step
