"""The small training run the trainer and sweep tests share, as a subprocess."""

import subprocess
import sys


def train(store, workdir, *extra, check=True):
  """Runs the trainer (a flag in `extra` overrides the same flag before it)."""
  cmd = [sys.executable, "-m", "sae_jax.train", f"--store={store}", f"--workdir={workdir}",
         "--num_latents=64", "--k=4", "--batch_size=64", "--steps=20", "--checkpoint_every=5",
         "--log_every=5", "--lr_warmup_steps=2", "--dead_tokens=256", "--normalize_inputs",
         "--data_lanes=2", *extra]
  result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  if check and result.returncode != 0:
    raise AssertionError(result.stdout[-1000:] + result.stderr[-3000:])
  return result
