"""What every command shows a user: its own flags under --help, one-line usage errors; and that
the JAX side imports on a machine without torch (a TPU pod)."""

import importlib.util
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import sae_jax

# Each command and flags of its own that --help must list (shared ones included: they are defined
# in harvest.llava, interpret.steering or harvest.flags, not in the command's module).
COMMANDS = {
    "harvest": ["model", "layers", "images", "out", "max_image_pixels", "store_dtype"],
    "sae_jax.store": ["store"],
    "sae_jax.train": ["store", "workdir", "k", "batch_size", "mesh"],
    "sae_jax.export": ["workdir", "out", "format", "hookpoint", "release", "hf_repo", "evals"],
    "sae_jax.bench": ["d_in", "num_latents", "k", "aot_devices", "architecture",
                      "batchtopk_max_k", "matryoshka_prefixes"],
    "sae_jax.scan": ["sae", "store", "out", "top_n", "max_active"],
    "interpret.explain": ["topacts", "explainer", "out", "batch_file", "batch_output",
                          "num_workers", "worker_index"],
    "interpret.dashboard": ["topacts", "explanations", "out", "concepts"],
    "interpret.steer": ["model", "dtype", "device", "prompt_mode", "sae", "layer", "latents",
                        "mode", "positions", "prompt"],
    "eval.clip_score": ["topacts", "explanations", "out", "clip_model"],
    "eval.sae_quality": ["model", "dtype", "prompt_mode", "sae", "layer", "images", "tokens"],
    "eval.hallucination": ["model", "dtype", "prompt_mode", "sae", "latents", "strengths",
                           "questions", "task", "predictions", "judge"],
    "eval.hallucination_latents": ["model", "sae", "questions", "task", "image_root", "mode",
                                   "strengths", "positions", "split", "seed", "top", "rank_by",
                                   "direction", "error", "resamples", "out"],
    "eval.concepts": ["topacts", "concepts", "out", "threshold", "match_iou", "min_images"],
    "eval.grounded_iou": ["method", "labels", "sae", "base_view", "topacts", "explanations",
                          "grounding_dino", "sam", "out", "threshold",
                          "box_threshold"],
    "eval.report": ["workdir", "out", "concepts", "grounded_iou"],
    "eval.sweep_report": ["sweep", "workdirs", "out", "title"],
    "eval.coco_objects": ["instances", "captions", "vocabulary", "num_images", "out"],
    "eval.world": ["out", "train_images", "subject_steps", "seed", "parts"],
    "eval.steer_concepts": ["model", "sae", "concepts", "images", "topacts", "scale", "pool", "out"],
    "eval.synthetic": ["model", "rows", "out", "dtype", "shard_rows", "sae", "store", "samples"],
}


def run(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_lists_the_commands_own_flags(command):
  result = run("-m", command, "--help")  # absl exits 1 after the help
  listed = set(re.findall(r"^\s+--(?:\[no\])?(\w+)", result.stdout, re.M))
  missing = [f for f in COMMANDS[command] if f not in listed]
  assert not missing, f"python -m {command} --help does not list {missing}"


@pytest.mark.parametrize("command", [
    ["sae_jax.export", "--workdir=w", "--out=o"],
    ["interpret.steer", "--model=m", "--prompt=p"],
    ["eval.sae_quality", "--model=m", "--sae=s", "--images=i"]], ids=lambda c: c[0])
def test_a_stray_argument_is_a_one_line_error(command):
  result = run("-m", *command, "stray")
  assert result.returncode != 0
  lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
  errors = [line for line in lines if "stray" in line]
  assert len(errors) == 1 and len(lines) <= 3, lines[:20]


def test_sae_jax_imports_without_torch():
  # sys.modules["torch"] = None makes every `import torch` raise ImportError, as on a TPU pod.
  # A command module defines its flags on import, so each gets an interpreter of its own.
  modules = [m.name for m in pkgutil.walk_packages(sae_jax.__path__, "sae_jax.")]
  sources = {m: Path(importlib.util.find_spec(m).origin).read_text() for m in modules}
  commands = [m for m in modules if re.search(r"\b(app|cli)\.run\(", sources[m])]
  for group in [[m for m in modules if m not in commands], *[[m] for m in commands]]:
    code = ("import importlib, sys\nsys.modules['torch'] = None\n"
            f"for name in {group!r}:\n  importlib.import_module(name)\n"
            "assert 'torch' not in {m.split('.')[0] for m, v in sys.modules.items() if v}\n"
            "print('ok')")
    result = run("-c", code)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
