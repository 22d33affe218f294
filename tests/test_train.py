"""The trainer as a user runs it: resume exactness after kill -9, export round trip, bad input."""

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import reference

import synthetic
from training import train

from sae_jax import data
from sae_jax.formats import dictionary
from sae_jax.store import META_DTYPE, Store, StoreWriter

D_MODEL = 16


@pytest.fixture(scope="module")
def store(tmp_path_factory):
  """A store of 4 shards of structured data: sparse combinations of 24 directions, offset."""
  return synthetic.write_sparse_store(tmp_path_factory.mktemp("store"), num_shards=4,
                                      d_model=D_MODEL)


def error_of(result) -> str:
  """The error of a failed run, after checking that it is all the run printed: one line."""
  assert result.returncode == 1, result.stderr[-3000:]
  [line] = result.stdout.splitlines()
  summary = json.loads(line)
  assert summary["ok"] is False and "\n" not in summary["error"]
  return summary["error"]


@pytest.fixture(scope="module")
def straight(store, tmp_path_factory):
  """The workdir of the uninterrupted run that the resumed ones must reproduce."""
  workdir = tmp_path_factory.mktemp("straight")
  train(store, workdir)
  return workdir


@pytest.fixture(scope="module")
def straight_params(straight, tmp_path_factory):
  folder = export(straight, tmp_path_factory.mktemp("export"), "sparsify")["export"]
  return dictionary.read(folder)[0]


def export(workdir, out, layout):
  result = subprocess.run([sys.executable, "-m", "sae_jax.export", f"--workdir={workdir}",
                           f"--out={out}", f"--format={layout}"], capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.splitlines()[-1])


def test_resume_after_kill_is_bit_identical(store, straight_params, tmp_path):
  killed = train(store, tmp_path / "resumed", "--debug_signal_at_step=13", check=False)
  assert killed.returncode == -9  # really killed, mid-run
  assert not (tmp_path / "resumed" / "checkpoints" / "20").exists()
  summary = json.loads(train(store, tmp_path / "resumed").stdout.splitlines()[-1])
  assert summary["step"] == 20
  resumed = dictionary.read(export(tmp_path / "resumed", tmp_path / "e2", "sparsify")["export"])[0]
  for name in dictionary.PARAM_NAMES:
    np.testing.assert_array_equal(straight_params[name], resumed[name], err_msg=name)
  # The metrics file reads as one run: each logged step once.
  rows = [json.loads(line) for line in open(tmp_path / "resumed" / "metrics.jsonl")]
  assert [row["step"] for row in rows] == [5, 10, 15, 20]
  # Past the 2 warmup steps the default rate 2e-4 / sqrt(n / 2^14) holds (constant schedule).
  assert rows[0]["lr"] == pytest.approx(2e-4 / np.sqrt(64 / 2**14))
  assert {"fvu", "mse", "auxk_loss", "dead_fraction", "grad_norm", "tokens_per_s",
          "floor_fraction"} <= set(rows[0])
  assert all(0 < row["floor_fraction"] < np.inf for row in rows)


def test_export_reproduces_the_jax_model_on_raw_activations(store, straight, tmp_path):
  from sae_jax.training import checkpoint
  model, run, _ = checkpoint.load_model(straight)
  scale = run["input_scale"]
  assert scale != pytest.approx(1.0)  # the test exercises the folding
  x = np.stack([Store(store)[i] for i in range(0, 1024, 7)])
  values, indices = (np.asarray(a) for a in model.encode(x * scale))
  x_hat = np.asarray(model(x * scale)) / scale
  for layout in ("sparsify", "saelens"):
    params, info = dictionary.read(export(straight, tmp_path / layout, layout)["export"])
    assert info["k"] == 4 and info["layout"] == layout
    ref_values, ref_indices = reference.encode_numpy(params, x, info["k"])
    order = np.argsort(-values, axis=1, kind="stable")
    np.testing.assert_array_equal(np.take_along_axis(indices, order, 1), ref_indices)
    np.testing.assert_allclose(np.take_along_axis(values, order, 1) / scale, ref_values,
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(reference.decode_numpy(params, ref_values, ref_indices), x_hat,
                               rtol=1e-4, atol=1e-4)


def test_sparsify_cfg_has_exactly_the_keys_the_papers_loader_accepts(store, tmp_path):
  train(store, tmp_path / "run", "--steps=5")
  folder = export(tmp_path / "run", tmp_path / "export", "sparsify")["export"]
  cfg = json.load(open(f"{folder}/cfg.json"))
  assert set(cfg) == {"expansion_factor", "normalize_decoder", "num_latents", "k", "multi_topk",
                      "d_in"}
  from safetensors.numpy import load_file
  tensors = load_file(f"{folder}/sae.safetensors")
  assert {k: v.shape for k, v in tensors.items()} == {
      "encoder.weight": (64, D_MODEL), "encoder.bias": (64,), "W_dec": (64, D_MODEL),
      "b_dec": (D_MODEL,)}
  np.testing.assert_allclose(np.linalg.norm(tensors["W_dec"], axis=1), 1.0, rtol=1e-5)


def test_init_from_an_export_starts_from_its_weights(store, tmp_path):
  train(store, tmp_path / "run", "--steps=5")
  folder = export(tmp_path / "run", tmp_path / "export", "saelens")["export"]
  train(store, tmp_path / "again", f"--init_from={folder}", "--steps=1", "--lr=1e-12")
  before = dictionary.read(folder)[0]
  after = dictionary.read(export(tmp_path / "again", tmp_path / "e2", "sparsify")["export"])[0]
  np.testing.assert_allclose(after["W_enc"], before["W_enc"], atol=1e-6)
  np.testing.assert_allclose(after["b_dec"], before["b_dec"], rtol=1e-5)


def test_sigterm_saves_a_checkpoint_and_the_rerun_finishes_the_same(store, straight_params,
                                                                    tmp_path):
  stopped = train(store, tmp_path / "resumed", "--debug_signal_at_step=12",
                  "--debug_signal=SIGTERM", check=False)
  assert stopped.returncode == 143, stopped.stderr[-3000:]  # an unfinished run, for `&&`
  assert (tmp_path / "resumed" / "checkpoints" / "12").exists()
  summary = json.loads(stopped.stdout.splitlines()[-1])
  assert summary["step"] == 12 and summary["preempted"] is True
  plan = json.loads((tmp_path / "resumed" / "flags.json").read_text())["resolved"]["kernel_plan"]
  assert plan["platform"] == "cpu" and not plan["grouped_topk"]  # what the step compiled with
  # How the run is carried out may change on resume: not what it computes.
  train(store, tmp_path / "resumed", "--checkpoint_every=3", "--log_every=4",
        "--prefetch_batches=0")
  resumed = dictionary.read(export(tmp_path / "resumed", tmp_path / "e2", "sparsify")["export"])[0]
  for name in dictionary.PARAM_NAMES:
    np.testing.assert_array_equal(straight_params[name], resumed[name], err_msg=name)


def rows_of_step(store, step, *, batch_size, tmp_path):
  """The global row indices of step `step`'s batch, read through the trainer's own pipeline from
  a store of the same shape whose rows hold their own index."""
  rows = Store(store).rows
  marked = synthetic.write_store(tmp_path / "marked", np.arange(rows)[:, None].repeat(2, 1),
                                 num_shards=len(Store(store).shards))
  rows = data.ChunkReader(Store(store))  # the trainer's defaults: 1 MiB chunks, 1 GiB buffer
  orders = data.lane_orders(rows, lanes=2, buffer_bytes=1 << 30, seed=0, process_index=0,
                            process_count=1)
  marked_rows = data.ChunkReader(Store(marked))
  assert np.array_equal(marked_rows.counts, rows.counts)  # the same chunks
  batch = next(data.batches(marked_rows, orders, batch_rows=batch_size, start_step=step - 1))
  return batch[:, 0].astype(int)


@pytest.mark.parametrize("decoder_norm", ["free", "unit"])
def test_a_non_finite_loss_stops_the_run_at_the_next_log_step(store, tmp_path, decoder_norm):
  acts = np.concatenate([Store(store).shard_acts(i) for i in range(4)])
  # One row of step 11's batch so large that its square overflows: the loss of step 11 is inf.
  acts[rows_of_step(store, 11, batch_size=64, tmp_path=tmp_path)[0]] = 3e38
  poisoned = synthetic.write_store(tmp_path / "poisoned", acts, num_shards=4)
  result = train(poisoned, tmp_path / "run", "--nonormalize_inputs", "--b_dec_init=zeros",
                 "--steps=16", "--log_every=4", "--checkpoint_every=5",
                 f"--decoder_norm={decoder_norm}", check=False)
  # Step 11 is no log step: its loss is recorded on the device, and the log of step 12 (fetched
  # one step late) stops the run at step 13 with it, before the checkpoint of step 15. With unit
  # decoder rows step 11's update made the weights NaN, so step 12's loss was NaN too; with free
  # norms the weights can stay finite, and only the record of every step's loss catches it.
  assert re.fullmatch(r"loss is (nan|inf) at step 11; the last good checkpoint is step 10 in "
                      + re.escape(str(tmp_path / "run" / "checkpoints")), error_of(result))
  assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["10", "5"]
  rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  assert [row["step"] for row in rows] == [4, 8]


@pytest.mark.parametrize("flag, message", [
    ("--k=100", "--k=100 exceeds"),
    ("--batch_size=5000", "fewer than one batch"),
    ("--token_kinds=text", "no rows of token kinds"),
    ("--token_kinds=patches", "--token_kinds: unknown kind(s) ['patches']"),
    ("--mesh=data:3", "needs 3 devices"),
    ("--matryoshka_prefixes=32,8", "--matryoshka_prefixes=32,8 must increase strictly, each in "
     "[1, num_latents=64)"),
    ("--matryoshka_prefixes=8,x", "--matryoshka_prefixes=8,x: expected comma-separated"),
])
def test_bad_flags_get_clear_errors(store, tmp_path, flag, message):
  assert message in error_of(train(store, tmp_path / "bad", flag, check=False))


def test_init_from_with_another_d_model_is_refused(store, tmp_path):
  rng = np.random.default_rng(0)
  params = {"W_enc": rng.normal(size=(64, 8)), "b_enc": np.zeros(64),
            "W_dec": rng.normal(size=(64, 8)), "b_dec": np.zeros(8)}
  folder = dictionary.write(tmp_path / "other", "h", params, k=4, layout="sparsify")
  error = error_of(train(store, tmp_path / "bad", f"--init_from={folder}", check=False))
  assert "d_in=8" in error and "d_model=16" in error


@pytest.mark.parametrize("extra", [[], ["--prefetch_batches=0"]],
                         ids=["reader_thread", "no_read_ahead"])
def test_a_corrupted_shard_stops_the_run_before_its_rows_are_used(store, tmp_path, extra):
  bad = shutil.copytree(store, tmp_path / "bad")
  raw = bytearray((bad / "shards" / "00002.acts.npy").read_bytes())
  raw[-1] ^= 1  # past the .npy header: the file still loads, only its checksum tells
  (bad / "shards" / "00002.acts.npy").write_bytes(bytes(raw))
  # With --b_dec_init=zeros and no --normalize_inputs, no row is read before the first batch.
  result = train(bad, tmp_path / "run", "--nonormalize_inputs", "--b_dec_init=zeros", *extra,
                 check=False)
  # Named by the checked chunk that holds the flipped byte: the file's last.
  info = Store(bad).shards[2]
  row_bytes = D_MODEL * 4
  end = info.chunks["offset"] + info.rows * row_bytes
  start = info.chunks["offset"] + (len(info.chunks["crc32c"]) - 1) * info.chunks["rows"] * row_bytes
  assert error_of(result) == (f"shard 2 of {bad}: shards/00002.acts.npy is corrupted at bytes "
                              f"[{start}, {end}) (CRC32C does not match the manifest); harvest "
                              "this store again")
  assert not list((tmp_path / "run" / "checkpoints").glob("*"))
  assert (tmp_path / "run" / "metrics.jsonl").read_text() == ""


@pytest.mark.parametrize("flag, old", [
    ("--store={other}", "--store={store}"),
    ("--batch_size=32", "--batch_size=64"),
    ("--lr=0.001", "--lr=0.0"),
    ("--normalize_inputs=false", "--normalize_inputs=true"),
    ("--token_kinds=image_base", "--token_kinds="),
    ("--k=8", "--k=4"),
    ("--num_latents=128", "--num_latents=64"),
    ("--seed=1", "--seed=0"),
])
def test_a_resume_refuses_flags_that_change_the_run(store, straight, tmp_path, flag, old):
  other = shutil.copytree(store, tmp_path / "same_rows_elsewhere")
  flag, old = flag.format(other=other), old.format(store=store)
  flags_json = (straight / "flags.json").read_text()
  checkpoints = sorted((straight / "checkpoints").iterdir())
  error = error_of(train(store, straight, flag, check=False))
  assert error == (f"{flag} but the run in {straight} used {old}; rerun with {old} to resume it, "
                   "or use a new --workdir")
  assert (straight / "flags.json").read_text() == flags_json
  assert sorted((straight / "checkpoints").iterdir()) == checkpoints


def test_a_resume_refuses_another_kernel_plan_unless_accepted(store, straight, tmp_path):
  """A run trained with the other kernels (native C++ against XLA: equal only to allclose) is not
  resumed silently; --accept_kernel_plan resumes it and records the new plan."""
  workdir = shutil.copytree(straight, tmp_path / "elsewhere")
  recorded = json.loads((workdir / "flags.json").read_text())
  here = dict(recorded["resolved"]["kernel_plan"])
  recorded["resolved"]["kernel_plan"]["native"] = not here["native"]
  (workdir / "flags.json").write_text(json.dumps(recorded))
  error = error_of(train(store, workdir, "--steps=25", check=False))
  assert error == (f"the run in {workdir} was trained with other kernels (native "
                   f"{not here['native']} -> {here['native']}; SAE_JAX_NATIVE, a C++ compiler and "
                   "the devices decide them), which agree only to allclose; resume where they "
                   "match, or pass --accept_kernel_plan to go on with these")
  summary = json.loads(train(store, workdir, "--steps=25", "--accept_kernel_plan"
                             ).stdout.splitlines()[-1])
  assert summary["step"] == 25
  assert json.loads((workdir / "flags.json").read_text())["resolved"]["kernel_plan"] == here


def test_steps_may_change_on_resume_unless_the_learning_rate_depends_on_them(store, tmp_path):
  train(store, tmp_path / "constant", "--steps=4")
  summary = json.loads(train(store, tmp_path / "constant", "--steps=6").stdout.splitlines()[-1])
  assert summary["step"] == 6
  train(store, tmp_path / "linear", "--steps=4", "--lr_decay=linear")
  error = error_of(train(store, tmp_path / "linear", "--steps=6", "--lr_decay=linear",
                         check=False))
  assert error == (f"--steps/--epochs give 6 steps but the run in {tmp_path / 'linear'} has 4, "
                   "and its learning rate (--lr_decay=linear, --lr_warmup_steps=2) depends on "
                   "the total; use a new --workdir")


def free_port():
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def train_two_processes(store, workdir, *extra, only_process_1=()):
  """Two real processes on localhost (CPU, gloo collectives) training one SAE together; the flags
  `only_process_1` go to the second alone."""
  port = free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "sae_jax.train", f"--store={store}", f"--workdir={workdir}",
       "--num_latents=64", "--k=4", "--batch_size=64", "--steps=20", "--checkpoint_every=5",
       "--log_every=5", "--lr_warmup_steps=2", "--dead_tokens=256", "--normalize_inputs",
       "--data_lanes=2", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
       f"--process_id={i}", *extra, *(only_process_1 if i == 1 else ())],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=300) for p in procs]
  return [p.returncode for p in procs], outputs


def test_two_processes_match_one_and_resume_after_a_kill(store, straight_params, tmp_path):
  codes, outputs = train_two_processes(store, tmp_path / "multi", "--debug_signal_at_step=13")
  assert -9 in codes, outputs
  codes, outputs = train_two_processes(store, tmp_path / "multi")
  assert codes == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
  assert "process 1 of 2" in outputs[1][1] and "resuming from step 10" in outputs[0][1]
  multi = dictionary.read(export(tmp_path / "multi", tmp_path / "e2", "sparsify")["export"])[0]
  for name in dictionary.PARAM_NAMES:
    # Same global batches; only the order of the cross-process sums differs.
    np.testing.assert_allclose(multi[name], straight_params[name], rtol=1e-4, atol=1e-5,
                               err_msg=name)


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(store, tmp_path):
  """SIGTERM reaches process 1 alone at step 12: both processes agree on a step, both save it and
  exit with 143 (none hangs in the next step's collectives), and the rerun ends bit-identical to
  two processes never interrupted."""
  # The processes agree in the background while they train on, so the stopped run is given many
  # more steps than it takes them; the constant learning rate lets the rerun shorten them.
  codes, outputs = train_two_processes(
      store, tmp_path / "stopped", "--steps=1000",
      only_process_1=("--debug_signal_at_step=12", "--debug_signal=SIGTERM"))
  assert codes == [143, 143], outputs[0][1][-3000:] + outputs[1][1][-3000:]
  summary = json.loads(outputs[0][0].splitlines()[-1])
  assert summary["preempted"] is True and 12 <= summary["step"] < 60, summary
  saved = sorted(int(p.name) for p in (tmp_path / "stopped" / "checkpoints").iterdir()
                 if p.name.isdigit())
  assert saved[-1] == summary["step"], saved
  codes, outputs = train_two_processes(store, tmp_path / "stopped", "--steps=60")
  assert codes == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
  assert f"resuming from step {summary['step']}" in outputs[0][1]
  codes, outputs = train_two_processes(store, tmp_path / "straight", "--steps=60")
  assert codes == [0, 0], outputs[0][1][-3000:]
  want = dictionary.read(export(tmp_path / "straight", tmp_path / "e1", "sparsify")["export"])[0]
  got = dictionary.read(export(tmp_path / "stopped", tmp_path / "e2", "sparsify")["export"])[0]
  for name in dictionary.PARAM_NAMES:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_an_fp8_store_trains_as_its_decoded_float32_copy(store, tmp_path):
  """fp8 rows go to the device packed and are decoded there: the same run as on the rows
  decoded on the host and stored as float32."""
  rows = np.concatenate([a for _, a, _ in Store(store).iter_shards()])
  fp8 = tmp_path / "fp8"
  writer = StoreWriter(fp8, {**{k: Store(store).manifest[k] for k in
                                ("model", "hookpoint", "layer", "d_model", "settings")},
                             "dtype": "float8_e4m3fn"})
  for i, part in enumerate(np.split(rows, 4)):
    writer.write_shard(part, np.zeros(len(part), META_DTYPE), [{"id": i}], num_inputs=1)
  writer.finish()
  decoded = synthetic.write_store(tmp_path / "decoded", np.concatenate(
      [a for _, a, _ in Store(fp8).iter_shards()]), num_shards=4)
  assert np.abs(np.asarray(Store(decoded).shard_acts(0)) - rows[:256]).max() > 0  # it rounds
  params = []
  for name, path in (("fp8", fp8), ("decoded", decoded)):
    train(path, tmp_path / f"run_{name}", "--steps=6")
    folder = export(tmp_path / f"run_{name}", tmp_path / f"export_{name}", "sparsify")["export"]
    params.append(dictionary.read(folder)[0])
  for name in dictionary.PARAM_NAMES:
    np.testing.assert_array_equal(params[0][name], params[1][name], err_msg=name)


BATCHTOPK = ("--architecture=batchtopk", "--matryoshka_prefixes=8,32", "--threshold_start_step=3",
             "--threshold_beta=0.9")


def model_state(workdir):
  """The trained model's variables by name (parameters, dead counters, threshold), its run record
  and its step."""
  import jax
  from flax import nnx

  from sae_jax.training import checkpoint
  model, run, step = checkpoint.load_model(workdir)
  state = {jax.tree_util.keystr(path): np.asarray(value)
           for path, value in jax.tree.leaves_with_path(nnx.state(model))}
  return state, run, step


@pytest.fixture(scope="module")
def batchtopk_straight(store, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("batchtopk")
  train(store, workdir, *BATCHTOPK)
  return workdir


def test_batchtopk_matryoshka_resumes_bit_identical_and_logs_its_inference(store,
                                                                          batchtopk_straight,
                                                                          tmp_path):
  killed = train(store, tmp_path / "resumed", *BATCHTOPK, "--debug_signal_at_step=13",
                 check=False)
  assert killed.returncode == -9
  train(store, tmp_path / "resumed", *BATCHTOPK)
  want, run, _ = model_state(batchtopk_straight)
  got, _, step = model_state(tmp_path / "resumed")
  assert step == 20 and run["sae"]["architecture"] == "batchtopk"
  assert set(got) == set(want) and float(want["['threshold'].value"]) > 0
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=str(name))
  rows = [json.loads(line) for line in open(tmp_path / "resumed" / "metrics.jsonl")]
  assert {"fvu_prefix_8", "fvu_prefix_32", "capped_fraction", "threshold", "inference_fvu",
          "inference_l0"} <= set(rows[-1])
  assert rows[-1]["threshold"] == float(want["['threshold'].value"])
  assert rows[-1]["l0"] == 4 and rows[-1]["inference_l0"] > 0


def test_batchtopk_on_two_processes_matches_one(store, batchtopk_straight, tmp_path):
  """The batch's cut counts over both processes' rows: the same run as on one process."""
  codes, outputs = train_two_processes(store, tmp_path / "multi", *BATCHTOPK)
  assert codes == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
  want, _, _ = model_state(batchtopk_straight)
  got, _, _ = model_state(tmp_path / "multi")
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5, err_msg=str(name))


def test_run_json_without_the_architecture_fields_still_loads(straight):
  """run.json files written before --architecture existed restore as TopK runs."""
  from sae_jax.model import SAEConfig
  run = json.loads((straight / "run.json").read_text())
  old = {k: v for k, v in run["sae"].items() if k not in (
      "architecture", "matryoshka_prefixes", "batchtopk_max_k", "threshold_beta",
      "threshold_start_step")}
  assert SAEConfig(**old) == SAEConfig(**run["sae"])
  assert SAEConfig(**old).architecture == "topk"


def test_a_run_from_before_free_decoder_norms_resumes_with_unit_rows(store, straight, tmp_path):
  """A workdir written before --decoder_norm existed had unit rows: resuming it under today's
  default (free) is refused with the knob to pass, and it resumes with that knob."""
  from sae_jax.model import SAEConfig
  workdir = shutil.copytree(straight, tmp_path / "old")
  for name in ("run.json", "flags.json"):
    record = json.loads((workdir / name).read_text())
    (record["sae"] if name == "run.json" else record).pop("decoder_norm")
    (workdir / name).write_text(json.dumps(record))
  assert SAEConfig.from_record(json.loads((workdir / "run.json").read_text())["sae"]
                               ).decoder_norm == "unit"
  error = error_of(train(store, workdir, "--steps=25", check=False))
  assert error == (f"{workdir} holds a run with another SAE config (--decoder_norm=free (the "
                   "run: unit)); rerun with its values to resume it, or use a new --workdir")
  summary = json.loads(train(store, workdir, "--steps=25", "--decoder_norm=unit"
                             ).stdout.splitlines()[-1])
  assert summary["step"] == 25


def test_each_checkpoint_holds_the_data_position_of_its_step(store, straight, tmp_path):
  """grain's iterator state saved with step N (the checkpoint's "data" item) is where the input
  pipeline stands after N batches: consumed here one by one from step 0, and built at step N."""
  reader = data.ChunkReader(Store(store))  # the trainer's defaults: 1 MiB chunks, 1 GiB buffer
  orders = data.lane_orders(reader, lanes=2, buffer_bytes=1 << 30, seed=0, process_index=0,
                            process_count=1)
  stream = data.batches(reader, orders, batch_rows=64)
  kept = {int(p.name) for p in (straight / "checkpoints").iterdir() if p.name.isdigit()}
  assert len(kept) > 1
  for step in range(1, 21):
    next(stream)
    if step in kept:
      saved = straight / "checkpoints" / str(step) / "data" / "process_0-of-1.json"
      assert json.loads(saved.read_text()) == stream.get_state()
      assert stream.get_state() == data.batches(reader, orders, batch_rows=64,
                                                start_step=step).get_state()
  # A saved position that the order does not give for its step is refused, not trained on.
  moved = shutil.copytree(straight, tmp_path / "moved")
  saved = moved / "checkpoints" / "20" / "data" / "process_0-of-1.json"
  state = json.loads(saved.read_text())
  state["parents"][0]["offset"] += 1
  saved.write_text(json.dumps(state))
  assert "data position saved with step 20" in error_of(train(store, moved, "--steps=25",
                                                               check=False))
