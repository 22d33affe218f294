"""launch/: every flagfile parses with the trainer's flags; the local multi-process script runs."""

import json
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
