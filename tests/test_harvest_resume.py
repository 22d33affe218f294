"""kill -9 in the middle of `python -m harvest`, rerun: the stores equal an uninterrupted run's."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from harvest.run import HarvestConfig, harvest
from sae_jax.store import Store

LAYERS = (0, 1)


def _flags(config: HarvestConfig) -> list[str]:
  return [f"--model={config.model}", f"--layers={','.join(map(str, config.layers))}",
          f"--images={config.images}", f"--out={config.out}", f"--tokens={config.tokens}",
          f"--batch_size={config.batch_size}", f"--shard_images={config.shard_images}"]


def _committed_shards(store: Path) -> int:
  try:
    return len(json.loads((store / "manifest.json").read_text())["shards"])
  except (FileNotFoundError, json.JSONDecodeError):
    return 0


def test_killed_harvest_resumes_to_the_same_store(tiny_model, synthetic_images, tmp_path):
  reference = HarvestConfig(
      model=str(tiny_model("llava_next")), layers=LAYERS, images=str(synthetic_images),
      out=str(tmp_path / "reference"), tokens="all", batch_size=2, shard_images=4)
  summary = harvest(reference, progress=False)
  total_shards = summary["shards"]
  assert total_shards == 24

  resumed = HarvestConfig(**{**reference.__dict__, "out": str(tmp_path / "resumed")})
  command = [sys.executable, "-m", "harvest", *_flags(resumed)]
  process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
  watched = Path(resumed.out) / f"layer_{LAYERS[-1]}"  # the layer whose shards are written last
  deadline = time.monotonic() + 120
  while _committed_shards(watched) < 1 and process.poll() is None and time.monotonic() < deadline:
    time.sleep(0.005)
  process.send_signal(signal.SIGKILL)
  process.wait()
  killed_at = _committed_shards(watched)
  assert 1 <= killed_at < total_shards, "the harvest was not killed in the middle"

  result = subprocess.run(command, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  rerun = json.loads(result.stdout.strip().splitlines()[-1])
  assert rerun["ok"] and rerun["resumed_from_input"] > 0

  for layer in LAYERS:
    expected = Store(Path(reference.out) / f"layer_{layer}", verify=True).manifest
    got = Store(Path(resumed.out) / f"layer_{layer}", verify=True).manifest
    assert got["shards"] == expected["shards"]  # same files, rows and sha256 per shard
    assert got == expected
