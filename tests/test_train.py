"""The trainer as a user runs it: resume exactness after kill -9, export round trip, bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest

import reference

import synthetic

from sae_jax import dictionary
from sae_jax.store import META_DTYPE, StoreWriter

D_MODEL = 16


@pytest.fixture(scope="module")
def store(tmp_path_factory):
  """A store of 4 shards of structured data: sparse combinations of 24 directions, offset."""
  return synthetic.write_sparse_store(tmp_path_factory.mktemp("store"), num_shards=4,
                                      d_model=D_MODEL)


def train(store, workdir, *extra, check=True):
  cmd = [sys.executable, "-m", "sae_jax.train", f"--store={store}", f"--workdir={workdir}",
         "--num_latents=64", "--k=4", "--batch_size=64", "--steps=20", "--checkpoint_every=5",
         "--log_every=5", "--lr_warmup_steps=2", "--dead_tokens=256", "--normalize_inputs", *extra]
  result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  if check and result.returncode != 0:
    raise AssertionError(result.stderr[-3000:])
  return result


def export(workdir, out, layout):
  result = subprocess.run([sys.executable, "-m", "sae_jax.export", f"--workdir={workdir}",
                           f"--out={out}", f"--format={layout}"], capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.splitlines()[-1])


def test_resume_after_kill_is_bit_identical(store, tmp_path):
  train(store, tmp_path / "straight")
  killed = train(store, tmp_path / "resumed", "--debug_signal_at_step=13", check=False)
  assert killed.returncode == -9  # really killed, mid-run
  assert not (tmp_path / "resumed" / "checkpoints" / "20").exists()
  summary = json.loads(train(store, tmp_path / "resumed").stdout.splitlines()[-1])
  assert summary["step"] == 20
  straight = dictionary.read(export(tmp_path / "straight", tmp_path / "e1", "sparsify")["export"])[0]
  resumed = dictionary.read(export(tmp_path / "resumed", tmp_path / "e2", "sparsify")["export"])[0]
  for name in dictionary.PARAM_NAMES:
    np.testing.assert_array_equal(straight[name], resumed[name], err_msg=name)
  # The metrics file reads as one run: each logged step once.
  rows = [json.loads(line) for line in open(tmp_path / "resumed" / "metrics.jsonl")]
  assert [row["step"] for row in rows] == [5, 10, 15, 20]
  # Past the 2 warmup steps the default rate 2e-4 / sqrt(n / 2^14) holds (constant schedule).
  assert rows[0]["lr"] == pytest.approx(2e-4 / np.sqrt(64 / 2**14))
  assert {"fvu", "mse", "auxk_loss", "dead_fraction", "grad_norm", "tokens_per_s",
          "floor_fraction"} <= set(rows[0])
  assert all(0 < row["floor_fraction"] < np.inf for row in rows)


def test_export_reproduces_the_jax_model_on_raw_activations(store, tmp_path):
  from sae_jax import checkpoint
  from sae_jax.store import Store
  train(store, tmp_path / "run")
  model, run, _ = checkpoint.load_model(tmp_path / "run")
  scale = run["input_scale"]
  assert scale != pytest.approx(1.0)  # the test exercises the folding
  x = np.stack([Store(store)[i] for i in range(0, 1024, 7)])
  values, indices = (np.asarray(a) for a in model.encode(x * scale))
  x_hat = np.asarray(model(x * scale)) / scale
  for layout in ("sparsify", "saelens"):
    params, info = dictionary.read(export(tmp_path / "run", tmp_path / layout, layout)["export"])
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


def test_sigterm_saves_a_checkpoint_and_the_rerun_finishes_the_same(store, tmp_path):
  train(store, tmp_path / "straight")
  stopped = train(store, tmp_path / "resumed", "--debug_signal_at_step=12",
                  "--debug_signal=SIGTERM")
  assert (tmp_path / "resumed" / "checkpoints" / "12").exists()
  assert json.loads(stopped.stdout.splitlines()[-1])["step"] == 12
  train(store, tmp_path / "resumed")
  straight = dictionary.read(export(tmp_path / "straight", tmp_path / "e1", "sparsify")["export"])[0]
  resumed = dictionary.read(export(tmp_path / "resumed", tmp_path / "e2", "sparsify")["export"])[0]
  for name in dictionary.PARAM_NAMES:
    np.testing.assert_array_equal(straight[name], resumed[name], err_msg=name)


def test_nan_loss_stops_and_names_the_step(tmp_path):
  writer = StoreWriter(tmp_path / "store", {"model": "synthetic", "hookpoint": "h", "layer": 0,
                                            "d_model": D_MODEL, "dtype": "float32",
                                            "settings": {}})
  acts = np.random.default_rng(0).normal(size=(512, D_MODEL)).astype(np.float32)
  acts[300:] = 3e38  # squares overflow: the loss becomes inf/NaN once these rows are drawn
  writer.write_shard(acts, np.zeros(512, META_DTYPE), [{"id": 0}], num_inputs=1)
  writer.finish()
  result = subprocess.run([
      sys.executable, "-m", "sae_jax.train", f"--store={tmp_path / 'store'}",
      f"--workdir={tmp_path / 'run'}", "--num_latents=32", "--k=4", "--batch_size=64",
      "--steps=8", "--checkpoint_every=1", "--b_dec_init=zeros"], capture_output=True, text=True,
      timeout=300)
  assert result.returncode != 0
  assert "loss is" in result.stderr and "at step 1;" in result.stderr
  assert "last good checkpoint is step None" in result.stderr


@pytest.mark.parametrize("flag, message", [
    ("--k=100", "--k=100 exceeds"),
    ("--batch_size=5000", "fewer than one batch"),
    ("--token_kinds=text", "no rows of token kinds"),
    ("--mesh=data:3", "needs 3 devices"),
])
def test_bad_flags_get_clear_errors(store, tmp_path, flag, message):
  result = train(store, tmp_path / "bad", flag, check=False)
  assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]


def test_init_from_with_another_d_model_is_refused(store, tmp_path):
  rng = np.random.default_rng(0)
  params = {"W_enc": rng.normal(size=(64, 8)), "b_enc": np.zeros(64),
            "W_dec": rng.normal(size=(64, 8)), "b_dec": np.zeros(8)}
  folder = dictionary.write(tmp_path / "other", "h", params, k=4, layout="sparsify")
  result = train(store, tmp_path / "bad", f"--init_from={folder}", check=False)
  assert result.returncode != 0 and "d_in=8" in result.stderr and "d_model=16" in result.stderr


def free_port():
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def train_two_processes(store, workdir, *extra):
  """Two real processes on localhost (CPU, gloo collectives) training one SAE together."""
  port = free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "sae_jax.train", f"--store={store}", f"--workdir={workdir}",
       "--num_latents=64", "--k=4", "--batch_size=64", "--steps=20", "--checkpoint_every=5",
       "--log_every=5", "--lr_warmup_steps=2", "--dead_tokens=256", "--normalize_inputs",
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
       *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=300) for p in procs]
  return [p.returncode for p in procs], outputs


def test_two_processes_match_one_and_resume_after_a_kill(store, tmp_path):
  train(store, tmp_path / "single")
  codes, outputs = train_two_processes(store, tmp_path / "multi", "--debug_signal_at_step=13")
  assert -9 in codes, outputs
  codes, outputs = train_two_processes(store, tmp_path / "multi")
  assert codes == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
  assert "process 1 of 2" in outputs[1][1] and "resuming from step 10" in outputs[0][1]
  single = dictionary.read(export(tmp_path / "single", tmp_path / "e1", "sparsify")["export"])[0]
  multi = dictionary.read(export(tmp_path / "multi", tmp_path / "e2", "sparsify")["export"])[0]
  for name in dictionary.PARAM_NAMES:
    # Same global batches; only the order of the cross-process sums differs.
    np.testing.assert_allclose(multi[name], single[name], rtol=1e-4, atol=1e-5, err_msg=name)
