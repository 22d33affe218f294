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


def _flag_values(config: Path) -> dict[str, str]:
  """{flag: value} of a flagfile (booleans written --name or --name=false)."""
  values = {}
  for line in config.read_text().splitlines():
    if line.startswith("--"):
      name, _, value = line[2:].partition("=")
      values[name] = value or "true"
  return values


def test_paper_config_is_the_papers_recipe_and_ours_differs_where_the_docs_say():
  paper = _flag_values(ROOT / "launch" / "configs" / "llava_next_8b_layer24_paper.flags")
  ours = _flag_values(ROOT / "launch" / "configs" / "llava_next_8b_layer24_ours.flags")
  # The paper's trainer (train/sae: README command, config.py and trainer.py defaults), as read in
  # /work/shared/research/paper-reference-code.md section 1.4.
  assert {name: float(paper[name]) for name in ("auxk_alpha", "adam_eps", "grad_clip", "lr")} == {
      "auxk_alpha": 0.0, "adam_eps": 1e-8, "grad_clip": 1.0, "lr": 0.0}
  assert (paper["num_latents"], paper["k"], paper["dead_tokens"]) == ("131072", "256", "10000000")
  assert (paper["compute_dtype"], paper["normalize_inputs"], paper["multi_topk"]) == (
      "float32", "false", "false")
  assert (paper["lr_warmup_steps"], paper["lr_decay"], paper["b_dec_init"]) == ("1000", "linear",
                                                                                 "median")
  differ = {name for name in paper.keys() | ours.keys() if paper.get(name) != ours.get(name)}
  table = (ROOT / "docs" / "reproduce_paper.md").read_text().split(
      "### The SAE's training recipe")[1].split("\n\n")[2]
  documented = {line.split("`")[1].lstrip("-") for line in table.splitlines()[2:]}
  assert differ == documented
