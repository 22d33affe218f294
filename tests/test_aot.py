"""bench --aot_devices / --aot_topology: the step compiled for a virtual CPU mesh or a TPU slice
(libtpu's compiler, no TPU), its per-device memory, collectives and kernel plan."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

N, D, K, BATCH = 1024, 32, 8, 64


def bench(*args):
  return subprocess.run([sys.executable, "-m", "sae_jax.bench", *args], capture_output=True,
                        text=True, timeout=300)


def plan(mesh, *extra, target="--aot_devices=8", n=N, d=D, k=K, batch=BATCH):
  result = bench(target, f"--mesh={mesh}", f"--d_in={d}", f"--num_latents={n}", f"--k={k}",
                 f"--batch_size={batch}", *extra)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.splitlines()[-1])


def shapes(report, op):
  """The [rows, cols] results of the collectives `op` in a plan."""
  return {tuple(int(n) for n in array.split("[")[1].rstrip("]").split(","))
          for name in report["collectives"] if name.startswith(op + " ")
          for array in name.split(" ")[1:] if array.count(",") == 1}


def gathered_widths(report):
  return {cols for _, cols in shapes(report, "all-gather")}


ITEMSIZE = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "pred": 1}


def assert_collectives_within_config(report, *, data, model, picks, n=N, d=D, batch=BATCH):
  """Every array any collective produces is a parameter's shard or gradient ([n/model, d],
  [n/model], [d]), a scalar, or a per-row array of this chip's batch rows whose bytes are at most
  what the config moves per row: `picks` candidates (values or indices) from each of the `model`
  shards, or a [rows, d] decode. So no pre-activations move, in any layout ([rows, n / s, s],
  [rows, n / 2], ...)."""
  rows = batch // data
  parameters = {(n // model, d), (n // model,), (d,), (n,), ()}
  per_rows = rows * max(model * picks, d) * 4
  for name in report["collectives"]:
    for array in name.split(" ")[1:]:
      kind, dims = array.rstrip("]").split("[")
      shape = tuple(int(x) for x in dims.split(",") if x)
      size = ITEMSIZE[kind] * math.prod(shape)
      assert shape in parameters or (shape[0] == rows and size <= per_rows), (
          name, rows, per_rows)


def test_latent_split_divides_the_state_and_never_gathers_pre_activations():
  replicated, split = plan("data:8,model:1"), plan("data:1,model:8")
  for part in ("parameters_and_counters", "optimizer_state"):
    # Everything but b_dec (d floats, replicated) is split 8 ways.
    assert split["per_device_gib"][part] == pytest.approx(
        replicated["per_device_gib"][part] / 8, rel=0.02)
  for report, (data, model) in ((replicated, (8, 1)), (split, (1, 8))):
    assert_collectives_within_config(report, data=data, model=model, picks=K)
    assert report["kernel_plan"]["platform"] == "cpu"
    # The trainer's own step, on bfloat16 rows (bench's default --store_dtype).
    assert report["program"] == "jit_scaled_step"
    assert report["per_device_gib"]["batch"] * 2**30 == BATCH // data * 2 * D
  # Gathered: 8 shards x min(k, n/8) top-k candidates; AuxK selects per shard, gathers nothing.
  assert gathered_widths(split) == {8 * K}
  exact_aux = plan("data:1,model:8", "--auxk_select=exact")
  assert gathered_widths(exact_aux) == {8 * K, 8 * D // 2}
  assert_collectives_within_config(exact_aux, data=1, model=8, picks=D // 2)
  assert exact_aux["collective_gib_per_step"] > split["collective_gib_per_step"]


def test_the_plan_compiles_the_trainers_step_on_batches_of_the_stores_dtype():
  """The trainer's own program (sae_jax.training.programs.jit_update) on fp8 rows as a run serves
  them: d bytes and a float32 scale a row (the default, bfloat16, is checked in the test above)."""
  report = plan("data:8,model:1", "--store_dtype=float8_e4m3fn")
  assert report["program"] == "jit_scaled_step"
  assert report["config"]["store_dtype"] == "float8_e4m3fn"
  assert report["per_device_gib"]["batch"] * 2**30 == BATCH // 8 * (D + 4)


def test_shard_capacity_shrinks_the_candidate_gathers():
  capped = plan("data:1,model:8", "--shard_capacity=2", "--auxk_select=exact")
  assert gathered_widths(capped) == {8 * 2 * K // 8, 8 * 2 * (D // 2) // 8}
  assert_collectives_within_config(capped, data=1, model=8, picks=2 * (D // 2) // 8)


def test_batchtopk_cuts_the_split_batch_with_scalar_all_reduces():
  """BatchTopK on a mesh that splits the batch (data:2) and the latents (model:4): each shard's
  candidates stay on it (no all-gather, no reduce-scatter of their cotangent), and the batch's cut
  (a bisection on counts) crosses chips as scalars; what moves per row is the decode's psum and
  per-row metrics."""
  report = plan("data:2,model:4", "--architecture=batchtopk")
  assert report["config"]["architecture"] == "batchtopk"
  assert not [name for name in report["collectives"]
              if name.startswith(("all-gather", "reduce-scatter"))], report["collectives"]
  assert_collectives_within_config(report, data=2, model=4, picks=4 * K)
  assert "all-reduce s32[]" in report["collectives"], report["collectives"]


# CI installs the tpu extra; elsewhere the TPU plan needs it.
needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None and not os.environ.get("CI"),
    reason="libtpu not installed: pip install -e '.[tpu]'")


@needs_libtpu
def test_a_tpu_plan_takes_the_accelerator_kernels_and_moves_no_pre_activations():
  """The paper's shape at toy size (d = 64, n = 64 d, k = 8, bfloat16) compiled by libtpu for a
  v5e 2x4 slice, latents over 4 chips and the batch over 2: accelerator kernels, no collective
  of a [rows, n]-sized result, and collective bytes within what the config accounts for."""
  n, d, k, batch, data, model = 4096, 64, 8, 512, 2, 4
  result = bench("--aot_topology=v5e:2x4", f"--mesh=data:{data},model:{model}", f"--d_in={d}",
                 f"--num_latents={n}", f"--k={k}", f"--batch_size={batch}",
                 "--compute_dtype=bfloat16")
  assert result.returncode == 0, result.stderr[-3000:]
  # Off a TPU host libtpu's warnings about hostnames and accelerator type are silenced.
  assert "TPU" not in result.stderr, result.stderr[-3000:]
  report = json.loads(result.stdout.splitlines()[-1])
  assert report["platform"] == "tpu" and report["topology"] == "v5e:2x4"
  assert report["kernel_plan"] == {"platform": "tpu", "native": False, "grouped_topk": True,
                                   "dense_products": True}
  for op in ("all-gather", "all-reduce", "reduce-scatter", "all-to-all"):
    assert not [s for s in shapes(report, op) if s[1] >= n // model], (op, report["collectives"])
  rows = batch // data
  # Per chip and step: the top-k candidates' all-gather (f32 values, s32 indices), the psums of
  # the top-k and AuxK decodes and of their cotangents, and the weight gradients' reduction over
  # "data" (W_enc, W_dec, b_enc and b_dec of this chip's latents), at 2x slack for small terms.
  bound = 2 * (rows * model * k * 8 + 4 * rows * d * 4 + (2 * n // model * (d + 1) + d) * 4)
  assert 0 < report["collective_gib_per_step"] * 2**30 < bound, report["collectives"]
  assert report["per_device_gib"]["xla_peak_estimate"] > 0
  assert report["cost_analysis"]["flops"] > 2 * batch * d * n / (data * model)


def test_without_libtpu_the_topology_flag_says_how_to_get_it():
  # sys.modules["libtpu"] = None hides the package, as on an install without the tpu extra.
  code = ("import runpy, sys\nsys.modules['libtpu'] = None\n"
          "sys.argv = ['bench', '--aot_topology=v5e:2x4']\n"
          "runpy.run_module('sae_jax.bench', run_name='__main__')")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 1
  assert 'pip install -e \\".[tpu]\\"' in result.stdout.splitlines()[-1], result.stdout
