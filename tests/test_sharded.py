"""The latent-sharded kernels (sharded.py) on 8 fake CPU devices, each test in a fresh process."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import synthetic


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_with_devices(args, num_devices: int = 8, timeout: int = 300, xla_flags: str = "") -> str:
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={num_devices} {xla_flags}"}
  result = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


STEPS_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from sae_jax.kernels import sharding
from sae_jax.training import step as step_lib
from sae_jax.config import SAEConfig

def run(cfg, mesh, batches):
  tx = step_lib.make_optimizer(1e-2)
  init = lambda: step_lib.create_state(cfg, tx, seed=0, b_dec=None, plan=PLAN)
  graphdef, _ = init()
  with jax.set_mesh(mesh):
    shardings = sharding.state_shardings(jax.eval_shape(lambda: init()[1]), mesh)
    state = jax.jit(lambda: init()[1], out_shardings=shardings)()
    update = jax.jit(lambda s, x: step_lib.train_step(graphdef, s, x), donate_argnums=0,
                     in_shardings=(shardings, sharding.batch_sharding(mesh)),
                     out_shardings=(shardings, None))
    losses = []
    for x in batches:
      state, metrics = update(state, x)
      losses.append(float(metrics["loss"]))
  assert float(metrics["auxk_loss"]) > 0  # latents died and AuxK ran
  return losses, jax.device_get(state)

def grads_and_eval(cfg, x):
  # Loss and gradients (of the parameters and of x) with 20 latents dead, and the eval metrics.
  graphdef, state = step_lib.create_state(cfg, step_lib.make_optimizer(1e-2), seed=0, b_dec=None,
                                          plan=PLAN)
  model, optimizer = nnx.merge(graphdef, state)
  count = np.zeros(cfg.num_latents, np.int32)
  count[np.random.default_rng(0).permutation(cfg.num_latents)[:20]] = 1000
  model.tokens_since_fired[...] = jnp.asarray(count)
  model.b_enc[...] = jnp.asarray(np.random.default_rng(1).normal(0, 0.1, cfg.num_latents),
                                 jnp.float32)
  graphdef, state = nnx.split((model, optimizer))

  def loss(params, x):
    model, _ = nnx.merge(graphdef, state, copy=True)
    nnx.update(model, params)
    return step_lib.losses(model, x, model.dead_mask())[0]

  params = nnx.state(model, nnx.Param)
  return (jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x),
          jax.jit(step_lib.eval_metrics, static_argnums=0)(graphdef, state, x))

batches = [jnp.asarray(np.random.default_rng(i).normal(0.2, 1.0, (32, 16)), jnp.float32)
           for i in range(4)]
# BatchTopK's cut over the batch split over "data" (its threshold learned from the second step),
# with Matryoshka prefixes that cut through the model shards.
batchtopk = dict(architecture="batchtopk", matryoshka_prefixes=(6, 24), threshold_start_step=1)
for extra, specs in ((dict(), ["data:8,model:1", "data:2,model:4"]),
                     (dict(multi_topk=True), ["data:4,model:2", "data:1,model:8"]),
                     (batchtopk, ["data:4,model:2", "data:2,model:4"])):
  # 8 latents per shard on model:8, fewer than the 4k = 16 Multi-TopK picks.
  # AuxK's exact selection, as on one device (per_shard: tests/test_auxk_select.py).
  cfg = SAEConfig(d_in=16, num_latents=64, k=4, auxk_alpha=0.5, k_aux=6, dead_tokens=40,
                  auxk_select="exact", **extra)
  want_losses, want = run(cfg, sharding.make_mesh("data:1,model:1", jax.devices()[:1]), batches)
  want_grads = grads_and_eval(cfg, batches[0])
  for spec in specs:
    with jax.set_mesh(sharding.make_mesh(spec)):
      got_grads = grads_and_eval(cfg, batches[0])
    for a, b in zip(jax.tree.leaves(want_grads), jax.tree.leaves(got_grads)):
      np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7, err_msg=spec)
    got_losses, got = run(cfg, sharding.make_mesh(spec), batches)
    np.testing.assert_allclose(got_losses, want_losses, rtol=1e-5, err_msg=spec)
    got = dict(jax.tree.leaves_with_path(got))
    for path, a in jax.tree.leaves_with_path(want):
      np.testing.assert_allclose(got[path], a, rtol=1e-4, atol=1e-6, err_msg=f"{spec} {path}")
  print("ok")
"""


# The plan of the devices, or the kernels a GPU or TPU runs (dense weight-gradient and
# AuxK-decode products per shard, grouped top-k) compiled for CPU devices; tests/test_model.py
# checks them against autodiff on one device.
PLANS = {"cpu": "PLAN = None\n",
         "accelerator": "from sae_jax.kernels.kernel_plan import KernelPlan\n"
                        "PLAN = KernelPlan.for_platform('gpu')\n"}


@pytest.mark.parametrize("rules", ["cpu", "accelerator"])
def test_train_steps_on_every_mesh_shape_match_one_device(rules):
  """8x1, 4x2, 2x4 and 1x8 meshes: gradients (no factor of the model-axis size), eval metrics, and
  losses, parameters, Adam moments and dead counters after 4 steps (AuxK active from the third,
  Multi-TopK in two of them, BatchTopK with Matryoshka and its threshold in a third) equal the
  one-device run's."""
  script = PLANS[rules] + STEPS_SCRIPT
  assert run_with_devices(["-c", script]).count("ok") == 3


HLO_SCRIPT = """
import re
import jax, numpy as np
from sae_jax.kernels import sharding
from sae_jax.training import step as step_lib
from sae_jax.config import SAEConfig
B, N, K, K_AUX, CAP = 32, 256, 4, 6, 12
tx = step_lib.make_optimizer(1e-3)
mesh = sharding.make_mesh("data:2,model:4")

def compiled(cfg):
  graphdef, _ = step_lib.create_state(cfg, tx, seed=0, b_dec=None)
  with jax.set_mesh(mesh):
    abstract = jax.eval_shape(lambda: step_lib.create_state(cfg, tx, seed=0, b_dec=None)[1])
    shardings = sharding.state_shardings(abstract, mesh)
    batch = jax.ShapeDtypeStruct((B, 16), np.float32, sharding=sharding.batch_sharding(mesh))
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         abstract, shardings)
    return jax.jit(lambda s, x: step_lib.train_step(graphdef, s, x),
                   in_shardings=(shardings, sharding.batch_sharding(mesh)),
                   out_shardings=(shardings, None)).lower(state, batch).compile().as_text()

def results(hlo, op):
  # "%name = f32[16,16]{1,0} all-gather(...)": the shapes of each such collective's result.
  return [tuple(map(int, shape.split(","))) if shape else ()
          for result in re.findall(r"= ([^=]*?) " + op + r"(?:-start)?\\(", hlo)
          for shape in re.findall(r"\\[([\\d,]*)\\]", result)]

gathered = results(compiled(SAEConfig(d_in=16, num_latents=N, k=K, k_aux=K_AUX)), "all-gather")
print(sorted(set(gathered)))
assert not [s for s in gathered if len(s) == 2 and s[0] in (B // 2, B) and s[1] == N], gathered
assert (B // 2, 4 * K) in gathered, gathered
assert (B // 2, 4 * K_AUX) not in gathered, gathered  # AuxK per shard: no candidates gathered
# BatchTopK: each shard's CAP candidates stay on it, so nothing is gathered and no candidates'
# cotangent is reduce-scattered; the batch's cut takes scalar all-reduces.
hlo = compiled(SAEConfig(d_in=16, num_latents=N, k=K, k_aux=K_AUX, architecture="batchtopk",
                         batchtopk_max_k=CAP))
assert not results(hlo, "all-gather") and not results(hlo, "reduce-scatter"), hlo
assert () in results(hlo, "all-reduce")
print("ok")
"""


BATCHTOPK_SCRIPT = """
import sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
sys.path.insert(0, "tests")
import reference
from sae_jax.kernels import sharding
from sae_jax.training import step as step_lib
from sae_jax.config import SAEConfig
D, N, K, B = 12, 64, 3, 16
for cap, seed in ((3, 0), (6, 1), (16, 2)):
  cfg = SAEConfig(d_in=D, num_latents=N, k=K, architecture="batchtopk", batchtopk_max_k=cap)
  rng = np.random.default_rng(seed)
  x = rng.normal(0.2, 1.0, (B, D))
  x[:4] *= 4  # loud tokens: with a tight cap some keep every candidate of a shard
  x = jnp.asarray(x, jnp.float32)
  with jax.set_mesh(sharding.make_mesh("data:2,model:4")):
    graphdef, state = step_lib.create_state(cfg, step_lib.make_optimizer(1e-2), seed=seed,
                                            b_dec=rng.normal(0, 0.1, D))
    model, _ = nnx.merge(graphdef, state)
    model.b_enc[...] = jnp.asarray(rng.normal(0, 0.1, N), jnp.float32)

    @jax.jit
    def picks(x):
      values, indices, _, _ = model.select(x)
      kept, _, extra = cfg.arch.select(cfg, values, indices)
      return kept, indices, extra["capped_fraction"]
    kept, indices, capped = picks(x)
  assert kept.shape == (B, 4 * cap), kept.shape  # each of the 4 shards' own candidates
  p = {name: np.asarray(getattr(model, name)[...], np.float64)
       for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
  pre = reference.pre_numpy(p, x) * reference.decoder_norms_numpy(p, cfg.decoder_norm)
  mask, cut, want_capped = reference.batchtopk_mask_numpy(pre, K, cap, shards=4)
  got = np.zeros((B, N), bool)
  np.put_along_axis(got, np.asarray(indices), np.asarray(kept) > 0, 1)
  np.testing.assert_array_equal(got, mask & (pre > 0), err_msg=str(cap))
  assert float(capped) == want_capped, (cap, float(capped), want_capped)
  if cap == 3:
    assert want_capped > 0  # the case where a cap changes the cut
  if want_capped == 0:  # then the cut of the whole flattened batch, as on one device
    np.testing.assert_array_equal(got.ravel(), pre.ravel() >= np.sort(pre.ravel())[-B * K])
print("ok")
"""


def test_batchtopk_on_latent_shards_cuts_each_shards_own_candidates():
  """On a data:2, model:4 mesh each shard offers its own top batchtopk_max_k per token and keeps
  them: the picks equal a float64 reference that caps per shard, then cuts the batch, and
  capped_fraction counts tokens with any shard's last candidate kept; uncapped, the picks are
  the whole batch's cut."""
  assert run_with_devices(["-c", BATCHTOPK_SCRIPT]).strip().endswith("ok")


def test_compiled_step_gathers_candidates_not_pre_activations():
  """On a 2x4 mesh the step all-gathers [B/2, 4k] candidates, never a [B/2 or B, n] matrix, and,
  with AuxK per shard, no AuxK candidates. BatchTopK gathers nothing."""
  assert run_with_devices(["-c", HLO_SCRIPT]).strip().endswith("ok")


D_MODEL, STEPS = 16, 4


@pytest.fixture(scope="module")
def store(tmp_path_factory):
  return synthetic.write_sparse_store(tmp_path_factory.mktemp("store"), num_shards=2,
                                      d_model=D_MODEL)


def train(store, workdir, steps, mesh=None, num_devices=1, *extra, xla_flags=""):
  args = ["-m", "sae_jax.train", f"--store={store}", f"--workdir={workdir}", "--num_latents=64",
          "--k=4", "--batch_size=64", f"--steps={steps}", f"--checkpoint_every={STEPS}",
          "--lr_warmup_steps=0", "--lr=1e-2", "--dead_tokens=64", "--multi_topk", *extra]
  return json.loads(run_with_devices(args + ([f"--mesh={mesh}"] if mesh else []), num_devices,
                                     xla_flags=xla_flags).splitlines()[-1])


def test_every_program_the_trainer_compiles_on_a_mesh_moves_no_pre_activations(store, tmp_path):
  """All programs of a run on a 2x4 mesh (init, floor, step, ...), as XLA compiled them: no
  collective result has the latent width n (a [B, n] pre-activation matrix or a whole [n, d]
  matrix), and AuxK (active: latents die) gathers no candidates."""
  from sae_jax import aot
  n = 256  # unlike every other width here: d = 16, B = 64, 4k = 16, n / 4 = 64
  summary = train(store, tmp_path / "run", 4, "data:2,model:4", 8, "--auxk_alpha=0.5",
                  f"--num_latents={n}", xla_flags=f"--xla_dump_to={tmp_path / 'hlo'} "
                  "--xla_dump_hlo_as_text --xla_dump_hlo_pass_re=^$")
  assert summary["auxk_loss"] > 0
  programs = sorted((tmp_path / "hlo").glob("*after_optimizations.txt"))
  assert any("train_step" in p.name or "scaled_step" in p.name for p in programs), programs
  for program in programs:
    counts, _ = aot.collectives(program.read_text())
    wide = [name for name in counts if f",{n}]" in name or f"[{n}," in name or f"[{n}]" in name]
    assert not wide, (program.name, wide)
    # AuxK's exact form would gather [B/2, 4 shards x k_aux = d/2] = [32, 32] candidates.
    assert not [name for name in counts if name.startswith("all-gather") and ",32]" in name]


def test_checkpoint_saved_on_one_mesh_resumes_on_others(store, tmp_path):
  """Saved on a 2x4 mesh at step N, resumed to 2N on 8x1 and on one device: both end where an
  uninterrupted one-device run does. AuxK is exact everywhere: its per-shard rule picks other
  latents than one device's where a shard holds more than its share of the dead ones
  (tests/test_auxk_select.py)."""
  from sae_jax.training import checkpoint
  exact = "--auxk_select=exact"
  assert train(store, tmp_path / "straight", 2 * STEPS, None, 1, exact)["auxk_loss"] > 0
  train(store, tmp_path / "resumed_8x1", STEPS, "data:2,model:4", 8, exact)
  shutil.copytree(tmp_path / "resumed_8x1", tmp_path / "resumed_1")
  train(store, tmp_path / "resumed_8x1", 2 * STEPS, "data:8,model:1", 8, exact)
  train(store, tmp_path / "resumed_1", 2 * STEPS, None, 1, exact)
  want, _, _ = checkpoint.load_model(tmp_path / "straight")
  for resumed in ("resumed_8x1", "resumed_1"):
    got, _, step = checkpoint.load_model(tmp_path / resumed)
    assert step == 2 * STEPS
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "tokens_since_fired"):
      np.testing.assert_allclose(getattr(got, name)[...], getattr(want, name)[...], rtol=1e-4,
                                 atol=1e-6, err_msg=f"{resumed} {name}")
