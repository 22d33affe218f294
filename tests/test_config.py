"""The knob schema (sae_jax.config) and the architecture registry (sae_jax.architectures).

Every knob must reach the config it belongs to from every command that has it: sae_jax.train's
flags, a sweep member's spec, and sae_jax.bench's flags (which the AOT planner uses); a value
outside a knob's declared choices or bounds is refused by name; and a newly registered
architecture trains through the same step with nothing but its module.
"""

import dataclasses
import re
from pathlib import Path

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sae_jax import config
from sae_jax import architectures
from sae_jax.training import step, sweep
from sae_jax.architectures.topk import TopK
from sae_jax.config import RunConfig, SAEConfig
from sae_jax.training.members import resolved_flags

D_IN, NUM_LATENTS = 32, 256


def other_value(field: dataclasses.Field, knob: config.Knob) -> str:
  """A command-line value for the knob that differs from its default and is valid alone."""
  default, allowed = field.default, config.choices(knob)
  if field.type == "bool":
    return str(not default).lower()
  if allowed is not None:
    return next(c for c in allowed if c != default)
  if field.type == "tuple[int, ...]":
    return "8,16"
  if field.type.startswith("tuple"):
    return "text,image_base"
  if field.type.startswith("int"):
    return str((default or 0) + 1)
  if field.type == "float":
    if knob.upper_bound is not None:
      return str((knob.lower_bound + knob.upper_bound) / 2)
    return str(default + 1.0)
  return "some_value"


def parsed(value: str, field: dataclasses.Field):
  """The value as the config holds it."""
  if field.type == "bool":
    return value == "true"
  if field.type == "tuple[int, ...]":
    return tuple(int(v) for v in value.split(","))
  if field.type.startswith("tuple"):
    return tuple(value.split(","))
  return type(field.default)(value) if field.default is not None else (
      int(value) if field.type.startswith("int") else value)


def fresh_flags(*classes, bench_only=False) -> flags.FlagValues:
  fv = flags.FlagValues()
  config.define_flags(*classes, bench_only=bench_only, flag_values=fv)
  return fv


def build_all(values: dict) -> dict:
  return {cls: (config.build(cls, values, d_in=D_IN, num_latents=NUM_LATENTS) if cls is SAEConfig
                else config.build(cls, values))
          for cls in (RunConfig, *config.MEMBER_CONFIGS)}


ALL_KNOBS = [(cls, f, k) for cls in (RunConfig, *config.MEMBER_CONFIGS)
             for f, k in config.knobs(cls)]


@pytest.mark.parametrize("cls,field,knob", ALL_KNOBS, ids=[f.name for _, f, _ in ALL_KNOBS])
def test_every_knob_reaches_its_config_from_train(cls, field, knob):
  fv = fresh_flags(RunConfig, *config.MEMBER_CONFIGS)
  value = other_value(field, knob)
  fv(["train", "--workdir=w", f"--{field.name}={value}"])
  got = getattr(build_all(config.flag_values(RunConfig, *config.MEMBER_CONFIGS,
                                             flag_values=fv))[cls], field.name)
  assert got == parsed(value, field) != field.default


MEMBER_KNOBS = [(cls, f, k) for cls, f, k in ALL_KNOBS if cls is not RunConfig]


@pytest.mark.parametrize("cls,field,knob", MEMBER_KNOBS, ids=[f.name for _, f, _ in MEMBER_KNOBS])
def test_every_member_knob_reaches_its_config_from_a_sweep_spec(cls, field, knob, tmp_path):
  fv = fresh_flags(RunConfig, *config.MEMBER_CONFIGS)
  fv(["train", "--workdir=w"])
  value = other_value(field, knob)
  member = sweep.parse_spec(f"--{field.name}={value}", "--sae", config.SWEEP_FLAGS, fv)
  values = resolved_flags(config.flag_values(RunConfig, *config.MEMBER_CONFIGS, flag_values=fv),
                          member.overrides, tmp_path / member.name)
  got = getattr(build_all(values)[cls], field.name)
  expected = parsed(value, field)
  if field.name in sweep.PATH_FLAGS:  # recorded absolute
    expected = str(Path(value).absolute())
  assert got == expected != field.default


def test_run_knobs_are_not_member_knobs():
  fv = fresh_flags(RunConfig, *config.MEMBER_CONFIGS)
  fv(["train", "--workdir=w"])
  for field, knob in config.knobs(RunConfig):
    with pytest.raises(sweep.SweepError, match=f"--{field.name} is the same for every member"):
      sweep.parse_spec(f"--{field.name}={other_value(field, knob)}", "--sae",
                       config.SWEEP_FLAGS, fv)


SAE_KNOBS = [(f, k) for f, k in config.knobs(SAEConfig)] + [
    (f, k) for f, k in config.knobs(RunConfig) if k.bench]


@pytest.mark.parametrize("field,knob", SAE_KNOBS, ids=[f.name for f, _ in SAE_KNOBS])
def test_every_sae_knob_reaches_the_config_from_bench(field, knob):
  fv = fresh_flags(SAEConfig, RunConfig, bench_only=True)
  value = other_value(field, knob)
  fv(["bench", f"--{field.name}={value}"])
  values = config.flag_values(SAEConfig, RunConfig, bench_only=True, flag_values=fv)
  cfg = config.build(SAEConfig, values, d_in=D_IN, num_latents=NUM_LATENTS)
  got = getattr(cfg, field.name) if field.name in values and hasattr(cfg, field.name) else (
      values[field.name])
  assert got == parsed(value, field) != field.default


def test_bench_has_no_run_only_knobs():
  fv = fresh_flags(SAEConfig, RunConfig, bench_only=True)
  assert "workdir" not in fv and "checkpoint_every" not in fv and "batch_size" in fv


@pytest.mark.parametrize("knob,value,message", [
    ("topk", "bogus", "topk='bogus'; expected one of exact, approx"),
    ("architecture", "relu", "architecture='relu'; expected one of topk, batchtopk"),
    ("topk_recall", 1.5, "topk_recall=1.5 must be <= 1"),
    ("dead_tokens", -1, "dead_tokens=-1 must be >= 0"),
])
def test_values_outside_a_knobs_declaration_are_refused_by_name(knob, value, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    SAEConfig(d_in=D_IN, num_latents=NUM_LATENTS, **{knob: value})


def test_a_list_knob_of_non_integers_is_refused_by_name():
  fv = fresh_flags(RunConfig, *config.MEMBER_CONFIGS)
  fv(["train", "--workdir=w", "--matryoshka_prefixes=8,x"])
  with pytest.raises(ValueError, match=r"^matryoshka_prefixes=8,x: expected comma-separated"):
    config.build(SAEConfig, config.flag_values(SAEConfig, flag_values=fv), d_in=D_IN,
                 num_latents=NUM_LATENTS)


def test_resume_and_sweep_sets_follow_the_declarations():
  assert config.RESUMABLE_FLAGS == {f.name for f, k in config.knobs(RunConfig) if k.resumable}
  assert set(config.SWEEP_FLAGS) == {f.name for cls in config.MEMBER_CONFIGS
                                     for f, _ in config.knobs(cls)}
  assert {"steps", "mesh", "workdir"} <= config.RESUMABLE_FLAGS
  assert not {"batch_size", "seed", "data_lanes"} & config.RESUMABLE_FLAGS


def test_an_old_run_record_reads_as_the_same_config():
  """run.json of runs from before the schema: k_aux null (the default) and no architecture."""
  current = dataclasses.asdict(SAEConfig(d_in=D_IN, num_latents=NUM_LATENTS))
  old = {**current, "k_aux": None}
  del old["architecture"], old["matryoshka_prefixes"]
  assert SAEConfig.from_record(old) == SAEConfig(d_in=D_IN, num_latents=NUM_LATENTS)


class TopOne(TopK):
  """A test architecture: each token keeps only its single largest pre-activation of TopK's k."""
  name = "top_one"

  def select(self, cfg, values, indices):
    return values[:, :1], indices[:, :1], {"kept_per_token": jnp.float32(1)}


def test_a_registered_architecture_trains_through_the_shared_step(monkeypatch):
  monkeypatch.setitem(architectures._REGISTRY, "top_one", TopOne())
  cfg = SAEConfig(d_in=D_IN, num_latents=NUM_LATENTS, k=4, architecture="top_one", auxk_alpha=0)
  tx = step.make_optimizer(1e-3)
  graphdef, state = step.create_state(cfg, tx, seed=0)
  x = jax.random.normal(jax.random.PRNGKey(1), (64, D_IN))
  model = state[0]
  W_enc, b_enc = np.asarray(model["W_enc"][...], np.float64), np.asarray(model["b_enc"][...])
  W_dec, b_dec = np.asarray(model["W_dec"][...], np.float64), np.asarray(model["b_dec"][...])
  _, metrics = jax.jit(step.train_step, static_argnums=0)(graphdef, state, x)

  # float64 reference: each row reconstructed from its one largest value (the ReLU
  # pre-activation times the decoder row's norm, the default --decoder_norm=free), decoded by the
  # pre-activation times the raw row.
  xs = np.asarray(x, np.float64)
  pre = np.maximum((xs - b_dec) @ W_enc.T + b_enc, 0)
  best = (pre * np.linalg.norm(W_dec, axis=1)).argmax(1)
  x_hat = pre[np.arange(len(xs)), best][:, None] * W_dec[best] + b_dec
  fvu = ((xs - x_hat) ** 2).sum() / ((xs - xs.mean(0)) ** 2).sum()
  assert float(metrics["l0"]) == 1.0 and float(metrics["kept_per_token"]) == 1.0
  np.testing.assert_allclose(float(metrics["fvu"]), fvu, rtol=1e-4)


def test_no_architecture_name_is_compared_outside_the_registry():
  """dictionary.py is the exception: it reads the export layouts, whose cfg.json names their
  inference encoder in the libraries' own words (SAELens's "topk" | "jumprelu")."""
  root = Path(config.__file__).parent
  compared = re.compile(r"""(==|!=|\bin)\s*\(?["'](topk|batchtopk)["']|["'](topk|batchtopk)["']\s*(==|!=)""")
  offenders = [f"{path.relative_to(root)}:{i}" for path in sorted(root.rglob("*.py"))
               if "architectures" not in path.parts and path.name != "dictionary.py"
               for i, line in enumerate(path.read_text().splitlines(), 1)
               if compared.search(line)]
  assert not offenders, offenders
