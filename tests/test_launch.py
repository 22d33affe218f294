"""launch/: every flagfile parses with the trainer's flags; the local multi-process script runs; the
SLURM array recipe runs each task as its harvest worker."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sae_jax.store import META_DTYPE, StoreWriter

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("config", sorted((ROOT / "launch" / "configs").glob("*.flags")),
                         ids=lambda p: p.name)
def test_flagfile_parses(config):
  text = config.read_text()
  assert text.startswith("#") and "python -m" in text  # starts with the command to run it
  result = subprocess.run([sys.executable, "-m", "sae_jax.train", f"--flagfile={config}",
                           "--store=unused", "--workdir=unused", "--helpshort"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
  assert "Flags parsing error" not in result.stdout + result.stderr, result.stderr[-2000:]
  assert "--store" in result.stdout  # help was printed, i.e. every flag was accepted


def test_local_multiprocess_script_trains(tmp_path):
  rng = np.random.default_rng(0)
  writer = StoreWriter(tmp_path / "store", {"model": "synthetic", "hookpoint": "h", "layer": 0,
                                            "d_model": 8, "dtype": "float32", "settings": {}})
  writer.write_shard(rng.normal(size=(512, 8)).astype(np.float32), np.zeros(512, META_DTYPE),
                     [{"id": 0}], num_inputs=1)
  writer.finish()
  result = subprocess.run(
      ["bash", "launch/local_multiprocess_cpu.sh", "2", f"--store={tmp_path / 'store'}",
       f"--workdir={tmp_path / 'run'}", "--num_latents=32", "--k=4", "--batch_size=64",
       "--steps=6", "--log_every=3", "--read_chunk_kb=4"],  # 4 chunks: 2 per process
      capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "process 1 of 2" in result.stderr
  assert [json.loads(l)["step"] for l in open(tmp_path / "run" / "metrics.jsonl")] == [3, 6]


def test_slurm_array_recipe_runs_the_task_as_its_worker(tiny_model, synthetic_images, tmp_path):
  env = {**os.environ, "SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_MIN": "1",
         "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_CPUS_PER_TASK": "1"}
  result = subprocess.run(
      ["bash", "launch/slurm_harvest_array.sbatch", f"--model={tiny_model('llava')}",
       "--layers=0", f"--images={synthetic_images}", f"--out={tmp_path / 'out'}",
       "--max_images=8", "--batch_size=2", "--shard_images=2"],
      capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads(result.stdout.splitlines()[-1])
  assert (summary["worker_index"], summary["num_workers"]) == (1, 2)
  assert summary["worker_inputs"] == [4, 8] and not summary["committed"]
