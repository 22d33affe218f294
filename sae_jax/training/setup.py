"""A run's setup, in the order the trainer does it: the input (stores, steps, input scales), each
member's model and optimizer, the mesh and kernel plan, the states (born sharded, or restored)
with their jitted programs, and the batch iterators from the earliest restored step."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
import optax

from sae_jax import config, data, logs
from sae_jax.formats import dictionary
from sae_jax.kernels import sharding
from sae_jax.training import checkpoint
from sae_jax.config import RunConfig, SAEConfig
from sae_jax.kernels.kernel_plan import KernelPlan
from sae_jax.training.metrics import MetricWriter
from sae_jax.model import geometric_median
from sae_jax.training.programs import jit_inference, jit_update
from sae_jax.training.step import create_state, default_learning_rate, lr_schedule, make_optimizer
from sae_jax.store import Store, StoreError
from sae_jax.files import atomic_write_json
from sae_jax.training.members import (Member, TrainError, changed_knobs, check_resumed_plan,
                                      check_resumed_total)


@dataclasses.dataclass
class Input:
  """The stores the members read, in lockstep: one reader per distinct store."""
  readers: dict  # store path -> data.ChunkReader
  token_kinds: list[str] | None
  data_lanes: int
  steps_per_epoch: int
  total_steps: int
  samples: dict = dataclasses.field(default_factory=dict)  # (store, rows) -> sampled rows
  seed: int = 0

  @property
  def rows(self) -> data.ChunkReader:
    return next(iter(self.readers.values()))

  @property
  def store(self) -> Store:
    return self.rows.store

  def sample(self, m: Member) -> np.ndarray:
    """The rows sampled for a member's input scale and b_dec init, shared by equal members."""
    key = (m.init.store, m.init.init_sample_rows)
    if key not in self.samples:
      self.samples[key] = data.sample_rows(self.readers[key[0]], key[1], seed=self.seed)
    return self.samples[key]


def open_input(run: RunConfig, members: list[Member]) -> Input:
  """The readers, the number of steps and data lanes, and each member's input scale."""
  # The stores have the same rows and are read in the same order, each batch once for all the
  # members that train on it.
  token_kinds = list(run.token_kinds) or None
  readers = {}
  for m in members:
    if m.init.store not in readers:
      readers[m.init.store] = data.ChunkReader(
          Store(m.init.store), token_kinds, chunk_bytes=run.read_chunk_kb << 10,
          read_threads=run.read_threads)
  rows, *others = readers.values()
  for other in others:
    data.check_lockstep(rows, other)
  if rows.num_rows < run.batch_size:
    raise StoreError(f"{rows.store.path} has {rows.num_rows} selected rows, fewer than one batch "
                     f"(--batch_size={run.batch_size})")
  # Fixed at the first start (flags.json), so that a resume may use another number of processes.
  old_flags = next((m.old_flags for m in members if m.old_flags is not None), None)
  data_lanes = (old_flags["resolved"]["data_lanes"] if old_flags is not None else
                run.data_lanes or jax.process_count())
  if run.batch_size % data_lanes or data_lanes % jax.process_count():
    raise TrainError(f"--batch_size={run.batch_size} must be divisible by the data lanes "
                     f"({data_lanes}), and they by the number of processes ({jax.process_count()})")
  per_epoch = rows.num_rows // run.batch_size
  total_steps = run.steps or int(run.epochs * per_epoch)
  if total_steps <= 0:
    raise TrainError(f"--epochs={run.epochs} of {per_epoch} steps each is no training; "
                     "set --steps or a larger --epochs")
  inp = Input(readers, token_kinds, data_lanes, per_epoch, total_steps, seed=run.seed)
  d_in = inp.store.d_model
  for m in members:
    if m.old_flags is not None:
      check_resumed_total(m, total_steps)
    if m.run is not None:
      m.input_scale = m.run["input_scale"]
    elif m.init.normalize_inputs:
      m.input_scale = float(np.sqrt(d_in / np.mean(np.sum(inp.sample(m).astype(np.float64) ** 2,
                                                          axis=1))))
  return inp


def build_models(members: list[Member], inp: Input) -> None:
  """Each member's SAE config, initial weights (--init_from), learning rate and optimizer."""
  d_in = inp.store.d_model
  for m in members:
    init, init_info = m.init, None
    if init.init_from:
      m.init_params, init_info = dictionary.read(init.init_from)
      if init_info["d_in"] != d_in:
        raise StoreError(f"--init_from={init.init_from} has d_in={init_info['d_in']} but "
                         f"--store={init.store} has d_model={d_in}")
      # An export acts on raw activations; the trainer sees scale * x: undo the export's folding.
      m.init_params = dictionary.fold_input_scale(m.init_params, 1 / m.input_scale)
    num_latents = (init_info["num_latents"] if init_info else
                   init.num_latents or init.expansion_factor * d_in)
    if m.flags["k"] > num_latents:
      raise m.error(f"--k={m.flags['k']} exceeds the number of latents ({num_latents})")
    try:
      m.cfg = config.build(SAEConfig, m.flags, d_in=d_in, num_latents=num_latents)
      if m.init_params is not None:
        m.init_params = m.cfg.arch.start_from(m.init_params, f"--init_from={init.init_from}",
                                              logs.note)
    except ValueError as e:  # each message starts with the flag's name
      raise m.error(f"--{e}") from e
    if m.run is not None and SAEConfig.from_record(m.run["sae"]) != m.cfg:
      raise TrainError(f"{m.workdir} holds a run with another SAE config "
                       f"({changed_knobs(SAEConfig.from_record(m.run['sae']), m.cfg)}); rerun "
                       "with its values to resume it, or use a new --workdir")
    o = m.optim
    m.peak_lr = o.lr or default_learning_rate(num_latents)
    m.schedule = lr_schedule(m.peak_lr, o.lr_warmup_steps, inp.total_steps, o.lr_decay)
    m.tx = make_optimizer(m.schedule, b1=o.adam_b1, b2=o.adam_b2, eps=o.adam_eps,
                          grad_clip=o.grad_clip or None)


def make_mesh(run: RunConfig, members: list[Member]) -> tuple[jax.sharding.Mesh, KernelPlan]:
  """The mesh, checked against the batch and the widths, and the kernels for its devices (which
  `bench --aot_topology` plans the same way)."""
  try:
    mesh = sharding.make_mesh(run.mesh)
  except ValueError as e:  # the message names --mesh
    raise TrainError(str(e)) from e
  if run.batch_size % mesh.shape["data"]:
    raise TrainError(f"--batch_size={run.batch_size} must be divisible by the data axis of "
                     f"the mesh ({mesh.shape['data']})")
  plan = KernelPlan.for_devices(mesh.devices.flat)
  for m in members:
    check_resumed_plan(m, plan, run.accept_kernel_plan)
  for m in members:
    if m.cfg.num_latents % mesh.shape["model"]:
      raise m.error(f"num_latents={m.cfg.num_latents} must be divisible by the model axis of "
                    f"the mesh ({mesh.shape['model']})")
  return mesh, plan


def record_flags(members: list[Member], inp: Input, plan: KernelPlan) -> None:
  """Each member's flags.json: its flags and what they resolved to on this start."""
  if jax.process_index() != 0:
    return
  for m in members:
    atomic_write_json(m.workdir / checkpoint.FLAGS_FILE, {
        **m.flags, "resolved": {"num_latents": m.cfg.num_latents, "lr": m.peak_lr,
                                "total_steps": inp.total_steps,
                                "steps_per_epoch": inp.steps_per_epoch,
                                "input_scale": m.input_scale, "kernel_plan": plan.to_json(),
                                "data_lanes": inp.data_lanes}})


def init_states(run: RunConfig, members: list[Member], inp: Input, mesh: jax.sharding.Mesh,
                plan: KernelPlan) -> int:
  """Each member's state (restored from its latest checkpoint, or born sharded), its jitted
  programs and metric writer; returns the earliest step any member starts from. Call under
  jax.set_mesh(mesh)."""
  store = inp.store
  for m in members:
    m.mngr = checkpoint.manager(m.workdir, keep=run.keep_checkpoints,
                                barrier_prefix=m.name and f"sweep_{m.name}_")
    m.start_step = m.mngr.latest_step() or 0
    init_state, graphdef_box = state_initializer(
        m.cfg, m.tx, plan, seed=run.seed, b_dec=None if m.start_step else b_dec_init(m, inp),
        init_params=m.init_params)
    abstract_state = jax.eval_shape(init_state)
    state_sharding = sharding.state_shardings(abstract_state, mesh)
    if m.start_step:
      logs.note(f"resuming from step {m.start_step} of {m.workdir}")
      m.state = checkpoint.restore(m.mngr, m.start_step, abstract_state, state_sharding)
    else:
      m.state = jax.jit(init_state, out_shardings=state_sharding)()
      if jax.process_index() == 0:
        manifest = inp.readers[m.init.store].store.manifest
        checkpoint.write_run(m.workdir, cfg=m.cfg, input_scale=m.input_scale, source={
            "store": m.init.store, "model": manifest["model"],
            "hookpoint": manifest["hookpoint"], "layer": manifest["layer"],
            "token_kinds": inp.token_kinds, "init_from": m.init.init_from})
    # Each member's own step, so that it computes exactly what a run of its flags alone would.
    m.update = jit_update(graphdef_box[0], m.input_scale, store.dtype, state_sharding, mesh)
    if m.cfg.arch.inference_differs:  # inference metrics at log steps
      m.inference = jit_inference(graphdef_box[0], m.input_scale, store.dtype, state_sharding,
                                  mesh)
    m.writer = MetricWriter(m.workdir, resume_step=m.start_step,
                            enabled=jax.process_index() == 0)
    m.last_good = m.start_step or None
  inp.samples.clear()
  return min(m.start_step for m in members)


def b_dec_init(m: Member, inp: Input):
  """A fresh member's b_dec: None when it starts from a dictionary (its own b_dec)."""
  if m.init_params is not None:
    return None
  if m.init.b_dec_init == "zeros":
    return jnp.zeros((inp.store.d_model,), jnp.float32)
  scaled = m.input_scale * inp.sample(m)
  return geometric_median(scaled) if m.init.b_dec_init == "median" else jnp.asarray(
      scaled.mean(0))


def state_initializer(cfg: SAEConfig, tx: optax.GradientTransformation, plan: KernelPlan, *,
                      seed: int, b_dec, init_params: dict | None):
  """A traceable () -> state (jitted with out_shardings, the state is born sharded), and a list
  that receives the state's graphdef when it is traced."""
  graphdef_box = []

  def init_state():
    graphdef, state = create_state(cfg, tx, seed=seed, b_dec=b_dec, plan=plan)
    if init_params is not None:
      model, optimizer = nnx.merge(graphdef, state)
      for name, value in init_params.items():
        getattr(model, name)[...] = jnp.asarray(value)
      graphdef, state = nnx.split((model, optimizer))
    graphdef_box.append(graphdef)
    return state

  return init_state, graphdef_box


def open_batches(run: RunConfig, inp: Input, first_step: int) -> dict:
  """One batch iterator per store, from `first_step`, every store in the same order."""
  try:
    orders = data.lane_orders(
        inp.rows, lanes=inp.data_lanes, buffer_bytes=run.shuffle_buffer_mb << 20, seed=run.seed,
        process_index=jax.process_index(), process_count=jax.process_count())
  except ValueError as e:
    raise TrainError(f"--store={inp.store.path}, --read_chunk_kb={run.read_chunk_kb}, "
                     f"--data_lanes={inp.data_lanes}: {e}") from e
  return {path: data.batches(reader, orders, batch_rows=run.batch_size // jax.process_count(),
                             start_step=first_step, prefetch_batches=run.prefetch_batches)
          for path, reader in inp.readers.items()}


def check_data_position(members: list[Member], batches: dict, first_step: int) -> None:
  """Refuses a resume whose saved data position (grain's iterator state, saved with the step) is
  not where the data order puts that step: the store or the order changed since."""
  for m in [m for m in members if first_step and m.start_step == first_step][:1]:
    b = batches[m.init.store]
    expected = b.get_state()
    if checkpoint.restore_data(m.mngr, first_step, b) and b.get_state() != expected:
      raise TrainError(f"--workdir={m.workdir}: the data position saved with step "
                       f"{first_step} is not where the data order puts that step: the store "
                       "or the order changed since it was saved; train in a new --workdir")
