"""Three harvest workers, one killed with -9 and rerun, commit the store one worker writes."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from harvest import workers
from harvest.run import HarvestConfig, harvest
from sae_jax.store import Store, StoreError

LAYERS = (0, 1)


@pytest.fixture(scope="module")
def inputs(synthetic_images, tmp_path_factory) -> Path:
  """40 images and 2 missing ones (bad images shift the image ids of every later shard)."""
  paths = sorted(synthetic_images.glob("*.png"))[:40]
  paths[5:5] = [synthetic_images / "missing_a.png"]
  paths[27:27] = [synthetic_images / "missing_b.png"]
  out = tmp_path_factory.mktemp("inputs") / "images.jsonl"
  out.write_text("".join(json.dumps({"image": str(p)}) + "\n" for p in paths))
  return out


def _config(tiny_model, inputs, out: Path, **kw) -> HarvestConfig:
  return HarvestConfig(model=str(tiny_model("llava")), layers=LAYERS, images=str(inputs),
                       out=str(out), tokens="all", batch_size=2, shard_images=4, **kw)


def _committed_shards(part: Path) -> int:
  try:
    return len(json.loads((part / "manifest.json").read_text())["shards"])
  except (FileNotFoundError, json.JSONDecodeError):
    return 0


def test_three_workers_one_killed_equal_one_worker(tiny_model, inputs, tmp_path):
  one = harvest(_config(tiny_model, inputs, tmp_path / "one"), progress=False)
  assert one["shards"] == 11 and one["bad_images"] == 2

  out = tmp_path / "three"
  killed = _config(tiny_model, inputs, out, num_workers=3, worker_index=1)
  command = [sys.executable, "-m", "harvest", f"--model={killed.model}", "--layers=0,1",
             f"--images={inputs}", f"--out={out}", "--tokens=all", "--batch_size=2",
             "--shard_images=4", "--num_workers=3", "--worker_index=1"]
  process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  part = out / "layer_1" / "parts" / "00001-of-00003"
  deadline = time.monotonic() + 120
  while _committed_shards(part) < 1 and process.poll() is None and time.monotonic() < deadline:
    time.sleep(0.005)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert 1 <= _committed_shards(part) < 4, "worker 1 was not killed in the middle"

  first = harvest(_config(tiny_model, inputs, out, num_workers=3, worker_index=0), progress=False)
  assert not first["committed"]  # worker 1 has not finished
  harvest(_config(tiny_model, inputs, out, num_workers=3, worker_index=2), progress=False)
  with pytest.raises(StoreError, match=r"2 of 3 worker parts finished \(unfinished: \[1\]\)"):
    Store(out / "layer_0")
  rerun = harvest(killed, progress=False)
  assert rerun["committed"] and rerun["resumed_from_input"] > rerun["worker_inputs"][0]

  for layer in LAYERS:
    expected = Store(tmp_path / "one" / f"layer_{layer}", verify=True)
    got = Store(out / f"layer_{layer}", verify=True)
    # The same manifest but for where each shard's activations are: in the worker's part.
    assert got.shards[3].files["acts"] == "parts/00001-of-00003/shards/00000.acts.npy"
    for m in (got.manifest, expected.manifest):
      for s in m["shards"]:
        s["files"].pop("acts")
    assert got.manifest == expected.manifest
    np.testing.assert_array_equal(got.meta(), expected.meta())
    assert got.images() == expected.images()
    for s in got.shards:
      np.testing.assert_array_equal(got.shard_acts(s.index), expected.shard_acts(s.index))


def test_committing_again_changes_nothing(tiny_model, inputs, tmp_path):
  out = tmp_path / "two"
  for index in (1, 0):
    summary = harvest(_config(tiny_model, inputs, out, num_workers=2, worker_index=index),
                      progress=False)
  assert summary["committed"]
  before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
  again = harvest(_config(tiny_model, inputs, out, num_workers=2, worker_index=1), progress=False)
  assert again["committed"]
  assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
  with pytest.raises(StoreError, match="harvest by 2 workers, not 3"):
    harvest(_config(tiny_model, inputs, out, num_workers=3, worker_index=0), progress=False)


@pytest.mark.parametrize("env, expected", [
    ({}, (0, 1)),
    ({"RANK": "2", "WORLD_SIZE": "4"}, (2, 4)),
    ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1",
      "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, (2, 3)),
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8"}, (5, 8)),
])
def test_worker_from_launcher_environment(env, expected):
  assert workers.resolve(0, -1, env) == expected
  assert workers.resolve(3, 1, env) == (1, 3)  # flags win


@pytest.mark.parametrize("num_workers, worker_index, env, message", [
    (3, -1, {}, "go together"),
    (0, -1, {"RANK": "4", "WORLD_SIZE": "4"}, r"worker index 4 of 4 workers \(from RANK"),
    (0, -1, {"RANK": "x", "WORLD_SIZE": "4"}, "RANK='x'"),
])
def test_bad_worker_settings(num_workers, worker_index, env, message):
  with pytest.raises(workers.WorkerError, match=message):
    workers.resolve(num_workers, worker_index, env)
