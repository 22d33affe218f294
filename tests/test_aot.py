"""bench --aot_devices: the step compiled for a virtual mesh, its per-device memory, collectives."""

import json
import subprocess
import sys

import pytest

N, D, K, BATCH = 1024, 32, 8, 64


def plan(mesh, *extra):
  result = subprocess.run(
      [sys.executable, "-m", "sae_jax.bench", "--aot_devices=8", f"--mesh={mesh}", f"--d_in={D}",
       f"--num_latents={N}", f"--k={K}", f"--batch_size={BATCH}", *extra],
      capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.splitlines()[-1])


def gathered_widths(report):
  return {int(name.split(",")[-1].rstrip("]")) for name in report["collectives"]
          if name.startswith("all-gather")}


def test_latent_split_divides_the_state_and_never_gathers_pre_activations():
  replicated, split = plan("data:8,model:1"), plan("data:1,model:8")
  for part in ("parameters_and_counters", "optimizer_state"):
    # Everything but b_dec (d floats, replicated) is split 8 ways.
    assert split["per_device_gib"][part] == pytest.approx(
        replicated["per_device_gib"][part] / 8, rel=0.02)
  for report in (replicated, split):
    assert N not in gathered_widths(report)  # no [B, n] all-gather, on either mesh
  # The candidates that are gathered: 8 shards x min(4k... k, n/8) top-k and x k_aux=d/2 AuxK.
  assert gathered_widths(split) == {8 * K, 8 * D // 2}


def test_shard_capacity_shrinks_the_candidate_gathers():
  capped = plan("data:1,model:8", "--shard_capacity=2")
  assert gathered_widths(capped) == {8 * 2 * K // 8, 8 * 2 * (D // 2) // 8}
