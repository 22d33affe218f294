"""The knobs of a training run, declared once: type, default, help, bounds, and where each may vary.

Every knob is a field of one of four dataclasses, with its flag's help and bounds in the field's
metadata (`knob(...)`):
  SAEConfig        what the SAE computes (the model, its selection, its losses);
  InitConfig       where a member starts: its store, input scale, width and initial weights;
  OptimizerConfig  how its parameters move;
  RunConfig        what the whole run shares: batches, steps, devices, bookkeeping.
`define_flags` turns the fields into typed absl flags (the trainer defines all four groups, the
benchmark and the AOT planner SAEConfig's and the few RunConfig knobs marked `bench`), and `build`
turns flag values back into a config, validated as the dataclass validates itself. A sweep member
may set the knobs of the first three groups (SWEEP_FLAGS); a resumed run may change only the
RunConfig knobs marked `resumable` (RESUMABLE_FLAGS). Adding a knob is one field here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from absl import flags

from sae_jax.kernels import rows, sharded
from sae_jax import architectures
from sae_jax.kernels.select import TOPK_METHODS


@dataclasses.dataclass(frozen=True)
class Knob:
  help: str
  choices: tuple[str, ...] | Callable[[], tuple[str, ...]] | None = None  # a callable: read late
  lower_bound: float | None = None
  upper_bound: float | None = None
  resumable: bool = False  # RunConfig: may change when a run resumes
  bench: bool = False  # RunConfig: also a flag of sae_jax.bench (SAEConfig's all are)
  required: bool = False


def knob(default, help: str, **kw) -> Any:
  return dataclasses.field(default=default, metadata={"knob": Knob(help, **kw)})


def choices(k: Knob) -> tuple[str, ...] | None:
  return k.choices() if callable(k.choices) else k.choices


def knobs(cls) -> list[tuple[dataclasses.Field, Knob]]:
  """The fields of `cls` that are flags, with their declarations."""
  return [(f, f.metadata["knob"]) for f in dataclasses.fields(cls) if "knob" in f.metadata]


def check_knobs(config) -> None:
  """Raises ValueError('name=value ...') for a value outside a knob's choices or bounds."""
  for field, k in knobs(type(config)):
    value = getattr(config, field.name)
    allowed = choices(k)
    if allowed is not None and value not in allowed:
      raise ValueError(f"{field.name}={value!r}; expected one of {', '.join(allowed)}")
    if k.lower_bound is not None and value < k.lower_bound:
      raise ValueError(f"{field.name}={value} must be >= {k.lower_bound}")
    if k.upper_bound is not None and value > k.upper_bound:
      raise ValueError(f"{field.name}={value} must be <= {k.upper_bound}")


@dataclasses.dataclass(frozen=True)
class SAEConfig:
  """What the SAE computes. d_in comes from the store and num_latents from InitConfig's width."""
  d_in: int
  num_latents: int
  k: int = knob(32, "Active latents per token.", lower_bound=1)
  architecture: str = knob(
      "topk", "topk: each token keeps its k largest latents. batchtopk: the batch keeps its "
      "batch_size * k largest (each token's top --batchtopk_max_k candidates); inference "
      "thresholds at a learned value (a JumpReLU).", choices=architectures.names)
  multi_topk: bool = knob(False, "Add the Multi-TopK loss (top-4k FVU / 8).")
  decoder_norm: str = knob(
      "free", "unit: decoder rows renormalised to norm 1 after every step, their gradient "
      "projected (OpenAI's recipe, sparsify). free: rows keep their norms, a latent's value is "
      "its pre-activation times its row's norm (so the top k rank by both) and the decode divides "
      "the norm out (SAELens's rescale_acts_by_decoder_norm); the export folds the norms in.",
      choices=("unit", "free"))
  auxk_alpha: float = knob(1 / 32, "AuxK loss coefficient (0 disables).", lower_bound=0)
  dead_tokens: int = knob(
      10_000_000, "A latent that has not fired for this many tokens is dead (0: every latent "
      "that did not fire in the previous batch).", lower_bound=0)
  k_aux: int = knob(0, "Dead latents AuxK reconstructs with (0: d_in / 2).", lower_bound=0)
  compute_dtype: str = knob("float32", "Matmul dtype; parameters and optimizer state stay "
                            "float32.", choices=("float32", "bfloat16"))
  topk: str = knob("exact", "exact: lax.top_k; approx: lax.approx_max_k (fast on TPU only).",
                   choices=TOPK_METHODS)
  topk_recall: float = knob(0.95, "Recall target of --topk=approx.", lower_bound=0,
                            upper_bound=1)
  # On a latent-sharded mesh, each shard offers ceil(shard_capacity * k / shards) candidates to
  # the global top-k (and likewise for AuxK): m*k -> capacity*k fewer candidates to all-gather.
  shard_capacity: float = knob(
      0.0, "With latents split over the mesh's model axis: each shard offers "
      "ceil(this * k / shards) top-k candidates (>= 1; exact unless one shard holds more of a "
      "token's winners). 0: exact, min(k, latents per shard) each.", lower_bound=0)
  auxk_select: str = knob(
      "per_shard", "With latents split over m shards: per_shard = AuxK reconstructs with each "
      "shard's own top dead latents (k_aux // m, one more on the first k_aux % m shards), no "
      "candidates cross chips; exact = the global top k_aux dead latents, an all-gather of "
      "[batch, m * k_aux] candidates every step. One device: exact either way.",
      choices=sharded.AUXK_SELECTS)
  weight_grads: str = knob(
      "auto", "How the backward forms the W_enc and W_dec gradients: scatter-add of the B*k "
      "picked rows, or a dense [n, B] x [B, d] matmul in --compute_dtype. auto: the matmul on "
      "GPU/TPU when latents (per shard) <= 1024 * k in bfloat16, 64 * k in float32.",
      choices=rows.WEIGHT_GRADS)
  batchtopk_max_k: int = knob(
      0, "BatchTopK: candidates per token, per latent shard on a mesh (0: min(4k, num_latents)); "
      "the capped_fraction metric says how often a token might have had more.", lower_bound=0)
  threshold_beta: float = knob(0.99, "BatchTopK: EMA weight of the old inference threshold (the "
                               "batch's cut drifts while training learns: a slow EMA lags it and "
                               "the JumpReLU fires less than k a row).",
                               lower_bound=0, upper_bound=1)
  threshold_start_step: int = knob(
      1000, "BatchTopK: the step from which the inference threshold is learned.", lower_bound=0)
  # Matryoshka (Bussmann et al. 2025), a wrapper around either selection.
  matryoshka_prefixes: tuple[int, ...] = knob(
      (), "Matryoshka: increasing inner dictionary widths; the latents [0, w) alone must also "
      "reconstruct (the loss is the mean FVU over them and the full width).")

  def __post_init__(self):
    # run.json gives a list; a trailing num_latents is the full level, always there.
    prefixes = tuple(int(w) for w in self.matryoshka_prefixes)
    if prefixes and prefixes[-1] == self.num_latents:
      prefixes = prefixes[:-1]
    object.__setattr__(self, "matryoshka_prefixes", prefixes)
    check_knobs(self)
    if not 0 < self.k <= self.num_latents:
      raise ValueError(f"k={self.k} must be in [1, num_latents={self.num_latents}]")
    if self.shard_capacity and self.shard_capacity < 1:
      raise ValueError(f"shard_capacity={self.shard_capacity} must be 0 (exact) or >= 1")
    if any(b <= a for a, b in zip(prefixes, prefixes[1:])) or not all(
        0 < w < self.num_latents for w in prefixes):
      raise ValueError(f"matryoshka_prefixes={','.join(map(str, prefixes))} must increase "
                       f"strictly, each in [1, num_latents={self.num_latents})")
    if self.multi_topk and 4 * self.k > self.num_latents:
      raise ValueError(f"multi_topk needs 4k={4 * self.k} <= num_latents={self.num_latents}")
    if self.multi_topk and prefixes:
      raise ValueError("multi_topk needs architecture=topk and no matryoshka_prefixes")
    if self.threshold_beta >= 1:
      raise ValueError(f"threshold_beta={self.threshold_beta} must be in [0, 1)")
    if self.batchtopk_max_k > self.num_latents:
      raise ValueError(f"batchtopk_max_k={self.batchtopk_max_k} must be in [0, num_latents="
                       f"{self.num_latents}]")
    self.arch.validate(self)

  @classmethod
  def from_record(cls, record: dict) -> SAEConfig:
    """The config of a run.json or export sidecar, also one written before a knob existed (or
    with k_aux None, as runs before the schema recorded the default; runs before decoder_norm
    had unit rows)."""
    return cls(**{**record, "k_aux": record.get("k_aux") or 0,
                  "decoder_norm": record.get("decoder_norm", "unit")})

  @property
  def arch(self) -> architectures.Architecture:
    return architectures.get(self.architecture)

  @property
  def num_aux(self) -> int:
    """How many dead latents AuxK reconstructs the residual with (0 when AuxK is off)."""
    if self.auxk_alpha == 0:
      return 0
    return min(self.k_aux or self.d_in // 2, self.num_latents)

  @property
  def num_selected(self) -> int:
    """Width of the sparse encoder's selection the architecture picks from."""
    return self.arch.selection_width(self)


@dataclasses.dataclass(frozen=True)
class InitConfig:
  """Where a member starts: its store, input scale, width and initial weights."""
  store: str | None = knob(None, "Activation store to train on (required, here or in every "
                           "--sae/--sweep spec).")
  normalize_inputs: bool = knob(
      False, "Scale inputs by one scalar so their mean squared norm is d_in (estimated from "
      "--init_sample_rows); the export folds the scale back in.")
  init_sample_rows: int = knob(16384, "Rows sampled for the input scale and the b_dec init.",
                               lower_bound=1)
  expansion_factor: int = knob(32, "num_latents = this * d_in, unless --num_latents is set.",
                               lower_bound=1)
  num_latents: int = knob(0, "Dictionary size (0: from --expansion_factor).", lower_bound=0)
  b_dec_init: str = knob("median", "Initial b_dec: geometric median or mean of a sample, or "
                         "zeros.", choices=("median", "mean", "zeros"))
  init_from: str | None = knob(None, "Start from an exported dictionary (ours, or any "
                               "sparsify/SAELens-layout folder) instead of a random init.")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Adam and its learning-rate schedule."""
  lr: float = knob(0.0, "Adam learning rate (0: 2e-4 / sqrt(num_latents / 2^14)).", lower_bound=0)
  lr_warmup_steps: int = knob(1000, "Linear warmup steps.", lower_bound=0)
  lr_decay: str = knob("constant", "Learning-rate shape after the warmup (decays reach 0 at the "
                       "end).", choices=("constant", "linear", "cosine"))
  adam_b1: float = knob(0.9, "Adam beta1.")
  adam_b2: float = knob(0.999, "Adam beta2.")
  adam_eps: float = knob(6.25e-10, "Adam epsilon (OpenAI's TopK recipe).")
  grad_clip: float = knob(0.0, "Global gradient-norm clip (0: none).", lower_bound=0)


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """What every member of a run shares."""
  workdir: str | None = knob(None, "Checkpoints, metrics and flags go here; rerunning with the "
                             "same workdir resumes.", resumable=True, required=True)
  token_kinds: tuple[str, ...] = knob((), "Train only on rows of these token kinds (image_base, "
                                      "image_other, text); empty = all rows.")
  batch_size: int = knob(4096, "Global batch, in tokens.", lower_bound=1, bench=True)
  steps: int = knob(0, "Training steps (0: --epochs over the store).", lower_bound=0,
                    resumable=True)
  epochs: float = knob(1.0, "Passes over the store when --steps=0.", lower_bound=0,
                       resumable=True)
  seed: int = knob(0, "Seed of the init and the data order.", bench=True)
  mesh: str = knob("data:-1,model:1", "Mesh axis sizes; one -1 fills.", resumable=True,
                   bench=True)
  distributed: str = knob("auto", "Multi-process start-up: auto = when --coordinator_address is "
                          "set or a TPU pod / SLURM job is detected.",
                          choices=("auto", "on", "off"), resumable=True)
  coordinator_address: str | None = knob(None, "host:port of process 0, for multi-process "
                                         "runs.", resumable=True)
  num_processes: int | None = knob(None, "Processes in the job.", lower_bound=1, resumable=True)
  process_id: int | None = knob(None, "This process's index.", lower_bound=0, resumable=True)
  checkpoint_every: int = knob(1000, "Save every this many steps.", lower_bound=1,
                               resumable=True)
  keep_checkpoints: int = knob(3, "Checkpoints kept.", lower_bound=1, resumable=True)
  log_every: int = knob(50, "Write metrics every this many steps.", lower_bound=1,
                        resumable=True)
  read_chunk_kb: int = knob(1024, "Bytes of contiguous rows per read request, in KiB (object "
                            "storage wants >= 1 MiB).", lower_bound=1)
  shuffle_buffer_mb: int = knob(
      1024, "Memory, in MiB, of the rows read and not yet served: three windows of chunks "
      "(serving, ready, being read), each shuffled; larger mixes the rows better.", lower_bound=1)
  data_lanes: int = knob(
      0, "Independent streams of windows the global batch is drawn from, in equal parts; each "
      "process reads its own lanes, so it must divide among them. The data order depends on "
      "this, not on the process count. 0: the number of processes.", lower_bound=0)
  read_threads: int = knob(16, "Read requests in flight.", lower_bound=1, resumable=True)
  prefetch_batches: int = knob(
      4, "Batches assembled ahead of the step, each batch_size / processes x d_in in the store's "
      "dtype (0: read and assemble each batch when it is due).", lower_bound=0, resumable=True)
  accept_kernel_plan: bool = knob(
      False, "Resume although this start's kernel plan (native C++ or XLA kernels, for the "
      "devices) differs from the one the run was trained with: the kernels agree only to "
      "allclose, so the resumed run is not bit-identical to an uninterrupted one.",
      resumable=True)
  debug_signal_at_step: int = knob(
      0, "Fault injection for tests: send --debug_signal to this process when this step is "
      "reached (after the checkpoints due before it are on disk).", lower_bound=0,
      resumable=True)
  debug_signal: str = knob("SIGKILL", "Signal of --debug_signal_at_step.",
                           choices=("SIGKILL", "SIGTERM"), resumable=True)


MEMBER_CONFIGS = (InitConfig, SAEConfig, OptimizerConfig)
# What a --sae/--sweep spec may set: what one SAE computes from the batches that every member of
# the sweep shares (the data order, batch size, steps and seed are the sweep's).
SWEEP_FLAGS = tuple(f.name for cls in MEMBER_CONFIGS for f, _ in knobs(cls))
# What a resumed run may change: how long it runs and how it is carried out, not what it computes.
RESUMABLE_FLAGS = frozenset(f.name for f, k in knobs(RunConfig) if k.resumable)


def _define(field: dataclasses.Field, k: Knob, flag_values: flags.FlagValues):
  kw = dict(name=field.name, default=field.default, help=k.help, flag_values=flag_values)
  if k.required:
    kw["required"] = True
  bounds = {name: getattr(k, name) for name in ("lower_bound", "upper_bound")
            if getattr(k, name) is not None}
  kind = field.type.replace(" | None", "")
  if kind.startswith("tuple"):
    return flags.DEFINE_list(**{**kw, "default": list(map(str, field.default))})
  if k.choices is not None:
    return flags.DEFINE_enum(enum_values=list(choices(k)), **kw)
  definer = {"int": flags.DEFINE_integer, "float": flags.DEFINE_float, "bool": flags.DEFINE_bool,
             "str": flags.DEFINE_string}[kind]
  return definer(**kw, **bounds)


def _selected(classes, bench_only: bool):
  return [(field, k) for cls in classes for field, k in knobs(cls)
          if not bench_only or cls is not RunConfig or k.bench]


def define_flags(*classes, bench_only: bool = False,
                 flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines a flag for each knob of `classes` (with `bench_only`, RunConfig's `bench` ones)."""
  for field, k in _selected(classes, bench_only):
    _define(field, k, flag_values)


def build(cls, values: dict, **fixed):
  """The config `cls` of flag values `values` (a dict by flag name, e.g. flags.json's or a sweep
  member's), plus `fixed` fields that are not flags (SAEConfig's d_in and num_latents)."""
  fields = {}
  for field, _ in knobs(cls):
    value = values[field.name]
    if field.type == "tuple[int, ...]":
      if not all(str(v).isdigit() for v in value):
        raise ValueError(f"{field.name}={','.join(map(str, value))}: expected comma-separated "
                         "non-negative integers")
      value = tuple(int(v) for v in value)
    elif field.type.startswith("tuple"):
      value = tuple(value)
    fields[field.name] = value
  return cls(**fields, **fixed)


def flag_values(*classes, bench_only: bool = False,
                flag_values: flags.FlagValues = flags.FLAGS) -> dict:
  """The values of the knob flags of `classes` (as `define_flags` defined them), by name."""
  return {f.name: flag_values[f.name].value for f, _ in _selected(classes, bench_only)}
