"""Many SAEs per data pass: each member of a sweep ends bit-identical to a run of its flags alone,
through kills and uneven resumes, on one store or several layers' stores read in lockstep."""

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

import synthetic
from training import train

from eval.reports import sweep as sweep_lib
from sae_jax.formats import dictionary
from sae_jax.training import checkpoint
from sae_jax.store import Store

# Members: another k, another learning rate, another width, another architecture.
SPECS = ["--k=8", "--lr=0.003 --name=fast", "--num_latents=128",
         "--architecture=batchtopk --matryoshka_prefixes=16 --threshold_start_step=5 --name=btk"]
NAMES = ["k8", "fast", "num_latents128", "btk"]
TIMING = ("tokens_per_s", "floor_fraction")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
  return synthetic.write_sparse_store(tmp_path_factory.mktemp("store"), num_shards=4)


@pytest.fixture(scope="module")
def other_layer(tmp_path_factory):
  """Another store with the same rows (as another layer of one harvest writes): other values."""
  return synthetic.write_sparse_store(tmp_path_factory.mktemp("layer"), num_shards=4, seed=1)


def sweep_flags(specs):
  return [f"--sae={spec}" for spec in specs]


def error_of(result) -> str:
  assert result.returncode == 1, result.stderr[-3000:]
  summary = json.loads(result.stdout.splitlines()[-1])
  assert summary["ok"] is False and "\n" not in summary["error"]
  return summary["error"]


def final_state(workdir, step=None) -> dict:
  """Every array of the model at a checkpoint, the latest unless `step` (parameters and
  dead-latent counters)."""
  model, _, step = checkpoint.load_model(workdir, step)
  return {"step": step, **{jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in
                           jax.tree_util.tree_leaves_with_path(nnx.state(model))}}


def metrics(workdir) -> list[dict]:
  """metrics.jsonl without the timings (which no two runs share)."""
  return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
          for line in open(workdir / "metrics.jsonl")]


def assert_same_run(got, want):
  a, b = final_state(got), final_state(want)
  assert a.keys() == b.keys()
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=f"{got}: {name}")
  assert metrics(got) == metrics(want)


@pytest.fixture(scope="module")
def separate(store, tmp_path_factory):
  """Each member's flags trained alone: the runs a sweep must reproduce."""
  root = tmp_path_factory.mktemp("separate")
  for name, spec in zip(NAMES, SPECS):
    train(store, root / name, *[f for f in spec.split() if not f.startswith("--name=")])
  return root


@pytest.fixture(scope="module")
def straight(store, tmp_path_factory):
  root = tmp_path_factory.mktemp("sweep")
  result = train(store, root, *sweep_flags(SPECS))
  return root, [json.loads(line) for line in result.stdout.splitlines()]


def test_each_member_equals_its_own_run(straight, separate, tmp_path):
  root, lines = straight
  for name in NAMES:
    assert_same_run(root / name, separate / name)
  # A line per member, as a single run prints its own, then the sweep's.
  assert [line.get("name") for line in lines] == [*NAMES, None]
  assert lines[-1] == {"workdir": str(root), "members": NAMES, "step": 20, "total_steps": 20}
  assert all(line["step"] == 20 and "fvu" in line for line in lines[:-1])
  assert "inference_fvu" in lines[3]
  record = json.loads((root / "sweep.json").read_text())
  assert record["members"][1] == {"name": "fast", "workdir": "fast", "overrides": {"lr": 0.003}}
  # A copy of the sweep folder (e.g. down from a pod) is read where it is.
  copy = shutil.copytree(root, tmp_path / "copied_sweep")
  assert [m.workdir for m in sweep_lib.read_sweep(copy)] == [copy / n for n in NAMES]
  # A member's workdir is a single run's: its flags.json, and the export works on it unchanged.
  resolved = json.loads((root / "fast" / "flags.json").read_text())
  assert resolved["lr"] == 0.003 and resolved["k"] == 4 and "sae" not in resolved
  out = subprocess.run([sys.executable, "-m", "sae_jax.export", f"--workdir={root / 'k8'}",
                        f"--out={tmp_path}", "--format=sparsify"], capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  params, info = dictionary.read(json.loads(out.stdout.splitlines()[-1])["export"])
  assert info["k"] == 8 and params["W_enc"].shape == (64, 16)


def test_the_sweep_report_shows_every_member_of_a_real_sweep(straight, tmp_path):
  root, lines = straight
  result = subprocess.run([sys.executable, "-m", "eval.sweep_report", f"--sweep={root}",
                           f"--out={tmp_path}"], capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  page = (tmp_path / "sweep.html").read_text()
  for name in NAMES:
    assert f"<td>{name}</td>" in page
  # The BatchTopK member's FVU and L0 are its inference (JumpReLU) numbers, from its last row.
  [btk] = [m for m in sweep_lib.read_sweep(root) if m.name == "btk"]
  assert btk.final.inference and btk.final.step == 20
  assert btk.final.fvu == metrics(root / "btk")[-1]["inference_fvu"]
  assert btk.architecture == "batchtopk matryoshka"


def test_a_killed_sweep_resumes_exactly_even_with_a_member_behind(store, straight, tmp_path):
  """kill -9 at step 13 (all saved step 10); one member then loses its step 10, so the rerun
  starts at 5 and the members at 10 skip the updates they have made."""
  killed = train(store, tmp_path, *sweep_flags(SPECS), "--debug_signal_at_step=13", check=False)
  assert killed.returncode == -9
  shutil.rmtree(tmp_path / "fast" / "checkpoints" / "10")
  result = train(store, tmp_path, *sweep_flags(SPECS))
  assert f"resuming from step 5 of {tmp_path / 'fast'}" in result.stderr
  assert f"resuming from step 10 of {tmp_path / 'k8'}" in result.stderr
  for name in NAMES:
    assert_same_run(tmp_path / name, straight[0] / name)


def test_a_sweep_file_gives_the_same_members(store, straight, tmp_path):
  """And a rerun of a finished sweep changes nothing; other members are refused."""
  sweep_file = tmp_path / "sweep.txt"
  sweep_file.write_text("# k, lr, width\n" + "\n\n".join(SPECS) + "\n")
  root = tmp_path / "run"
  shutil.copytree(straight[0], root)
  train(store, root, f"--sweep={sweep_file}")
  for name in NAMES:
    assert_same_run(root / name, straight[0] / name)
  error = error_of(train(store, root, *sweep_flags(SPECS[:2] + ["--k=2"]), check=False))
  assert error == (f"the sweep in {root} has other members: this one adds k2; drops btk, "
                   "num_latents128; rerun with the same --sae/--sweep specs to resume it, or use "
                   "a new --workdir")


def test_layers_in_lockstep_equal_their_own_runs(store, other_layer, separate, tmp_path):
  train(other_layer, tmp_path / "alone")
  result = train(store, tmp_path / "sweep", f"--sae=--store={other_layer} --name=layer",
                 "--sae=--k=8")
  assert json.loads(result.stdout.splitlines()[-1])["members"] == ["layer", "k8"]
  assert_same_run(tmp_path / "sweep" / "layer", tmp_path / "alone")
  assert_same_run(tmp_path / "sweep" / "k8", separate / "k8")
  run = json.loads((tmp_path / "sweep" / "layer" / "run.json").read_text())
  assert run["source"]["store"] == str(other_layer)


def test_stores_of_another_layout_are_refused(store, tmp_path):
  acts = np.concatenate([Store(store).shard_acts(i) for i in range(4)])
  halves = synthetic.write_store(tmp_path / "halves", acts, num_shards=2)
  error = error_of(train(store, tmp_path / "run", f"--sae=--store={halves}", "--sae=--k=8",
                         check=False))
  assert error == (f"--store={halves} and --store={store} cannot be read in lockstep: their "
                   "shard rows differ ([512, 512] vs [256, 256, 256, 256]); a sweep's stores must "
                   "have the same rows (the layers of one harvest)")


def test_a_diverging_member_stops_alone(store, tmp_path):
  """Rows so large that their squares overflow: that member's loss is not finite from step 1. It
  stops with no checkpoint; the member on a sane store trains on and equals its own run."""
  acts = np.concatenate([Store(store).shard_acts(i) for i in range(4)])
  huge = synthetic.write_store(tmp_path / "huge", acts * 1e20, num_shards=4)
  flags = ["--nonormalize_inputs", "--b_dec_init=zeros", "--steps=12", "--log_every=4"]
  train(store, tmp_path / "alone", *flags)
  result = train(store, tmp_path / "sweep", *flags, f"--sae=--store={huge} --name=huge",
                 "--sae=--name=sane", check=False)
  lines = [json.loads(line) for line in result.stdout.splitlines()]
  message = ("sweep member huge: loss is nan at step 1; the last good checkpoint is none (no "
             "checkpoint was saved)")
  assert error_of(result) == message
  assert lines[0] == {"name": "huge", "workdir": str(tmp_path / "sweep" / "huge"), "ok": False,
                      "error": message, "last_good_step": None}
  assert lines[1]["name"] == "sane" and lines[1]["step"] == 12
  assert not list((tmp_path / "sweep" / "huge" / "checkpoints").iterdir())
  assert_same_run(tmp_path / "sweep" / "sane", tmp_path / "alone")


def two_process_sweep(store, workdir, *extra, only_process_1=()):
  """A sweep of two members trained by two processes: their exit codes and outputs."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = [subprocess.Popen(
      [sys.executable, "-m", "sae_jax.train", f"--store={store}", f"--workdir={workdir}",
       "--num_latents=64", "--k=4", "--batch_size=64", "--steps=20", "--checkpoint_every=5",
       "--log_every=5", "--lr_warmup_steps=2", "--dead_tokens=256", "--normalize_inputs",
       "--data_lanes=2", *sweep_flags([SPECS[0], SPECS[2]]),
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
       *extra, *(only_process_1 if i == 1 else ())],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=300) for p in procs]
  return [p.returncode for p in procs], outputs


@pytest.fixture(scope="module")
def two_process_straight(store, tmp_path_factory):
  """A sweep of two members trained by two processes to step 40, never interrupted, every
  checkpoint kept: the run both two-process tests check (its step 20 against single runs of 20
  steps, as the learning rate is constant after the warmup; its end against a rerun after
  SIGTERM)."""
  root = tmp_path_factory.mktemp("two_process_straight")
  codes, outputs = two_process_sweep(store, root, "--steps=40", "--keep_checkpoints=8")
  assert codes == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
  return root


def test_two_processes_train_a_sweep_as_one(two_process_straight, separate):
  """Each process saves every member at the same steps (orbax barriers of their own)."""
  root = two_process_straight
  for name in (NAMES[0], NAMES[2]):
    got, want = final_state(root / name, step=20), final_state(separate / name)
    assert got["step"] == want["step"] == 20
    assert [int(p.name) for p in sorted((root / name / "checkpoints").iterdir(),
                                        key=lambda p: int(p.name))] == list(range(5, 41, 5))
    for key in want:  # the same global batches; only the order of cross-process sums differs
      np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-5, err_msg=key)


def test_sigterm_to_one_of_two_processes_stops_the_sweep_as_a_single_run(
    store, two_process_straight, tmp_path):
  """SIGTERM reaches process 1 alone at step 12: both processes save every member at one step and
  exit with 143, and the rerun ends bit-identical to a sweep never interrupted."""
  codes, outputs = two_process_sweep(
      store, tmp_path / "stopped", "--steps=1000",
      only_process_1=("--debug_signal_at_step=12", "--debug_signal=SIGTERM"))
  assert codes == [143, 143], outputs[0][1][-3000:] + outputs[1][1][-3000:]
  summary = json.loads(outputs[0][0].splitlines()[-1])
  assert summary["preempted"] is True and 12 <= summary["step"] < 40, summary
  for name in (NAMES[0], NAMES[2]):
    saved = sorted(int(p.name) for p in (tmp_path / "stopped" / name / "checkpoints").iterdir()
                   if p.name.isdigit())
    assert saved[-1] == summary["step"], (name, saved)
  codes, outputs = two_process_sweep(store, tmp_path / "stopped", "--steps=40")
  assert codes == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
  for name in (NAMES[0], NAMES[2]):
    got, want = final_state(tmp_path / "stopped" / name), final_state(two_process_straight / name)
    assert got["step"] == 40 and got.keys() == want.keys()
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=f"{name} {key}")


@pytest.mark.parametrize("specs, message", [
    (["--k=8", "--batch_size=32"], "--sae=--batch_size=32: --batch_size is the same for every "
     "member of a sweep (a spec may set only --store, "),
    (["--k=8", "--k=8 --lr=0.1 --name=k8"], "--sae='--k=8 --lr=0.1 --name=k8' and --sae=--k=8 "
     "both name a member 'k8'; give one of them another --name="),
    (["--kk=8"], "--sae=--kk=8: unknown flag --kk"),
    (["--k=0"], "--sae=--k=0: --k=0: "),
    (["--k"], "--sae=--k: --k needs a value (--k=...)"),
])
def test_bad_specs_get_one_line_errors(store, tmp_path, specs, message):
  assert error_of(train(store, tmp_path, *sweep_flags(specs), check=False)).startswith(message)
  assert not (tmp_path / "sweep.json").exists()


def test_the_example_sweep_file_parses():
  code = ("from absl import flags\nfrom sae_jax import config, train\n"
          "from sae_jax.training import sweep\n"
          "print([m.name for m in sweep.read_specs([], 'launch/configs/sweep_example.txt', "
          "config.SWEEP_FLAGS, flags.FLAGS)])")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[1])
  assert result.stdout.strip() == "['k4', 'k16', 'k8_fast', 'k8_expansion_factor16']", (
      result.stderr[-2000:])
