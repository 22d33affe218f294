"""benchmarks/resample_store.py: rows drawn with replacement from a store's first rows."""

import subprocess
import sys
from pathlib import Path

import numpy as np

from sae_jax.store import META_DTYPE, Store, StoreWriter

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "resample_store.py"


def source_store(path: Path) -> np.ndarray:
  rows = np.random.default_rng(0).normal(size=(100, 8)).astype(np.float32)
  writer = StoreWriter(path, {"model": "m", "hookpoint": "h", "layer": 0, "d_model": 8,
                              "dtype": "bfloat16", "settings": {}})
  for i, part in enumerate(np.split(rows, 2)):
    meta = np.zeros(len(part), META_DTYPE)
    writer.write_shard(part, meta, [{"id": i}], num_inputs=1)
  writer.finish()
  (path / "synthetic_model").mkdir()
  (path / "synthetic_model" / "synthetic_model_config.json").write_text("{}")
  return np.concatenate([Store(path).shard_acts(i).astype(np.float32) for i in range(2)])


def resample(*flags: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, str(SCRIPT), *flags], capture_output=True, text=True)


def test_draws_are_rows_of_the_source_prefix(tmp_path):
  source = source_store(tmp_path / "src")
  flags = [f"--source={tmp_path / 'src'}", "--rows=130", "--source_rows=70", "--seed=3",
           "--shard_rows=64"]
  assert resample(*flags, f"--out={tmp_path / 'a'}").returncode == 0
  out = Store(tmp_path / "a")
  assert out.rows == 130 and [s.rows for s in out.shards] == [64, 64, 2]
  drawn = np.concatenate([out.shard_acts(i).astype(np.float32) for i in range(3)])
  # Each drawn row is one of the first 70 source rows, bit for bit (bfloat16 round-trips).
  match = (drawn[:, None, :] == source[None, :, :]).all(-1)
  assert match.any(1).all() and not match[:, 70:].any()
  picks = match.argmax(1)
  assert len(np.unique(picks)) < 130  # with replacement: 130 draws from 70 rows repeat some
  np.testing.assert_array_equal(picks, np.random.default_rng(3).integers(0, 70, 130))
  assert (tmp_path / "a" / "synthetic_model" / "synthetic_model_config.json").exists()
  # The same flags draw the same rows.
  assert resample(*flags, f"--out={tmp_path / 'b'}").returncode == 0
  again = np.concatenate([Store(tmp_path / "b").shard_acts(i) for i in range(3)])
  np.testing.assert_array_equal(again.astype(np.float32), drawn)


def test_refuses_more_source_rows_than_the_store_holds(tmp_path):
  source_store(tmp_path / "src")
  result = resample(f"--source={tmp_path / 'src'}", f"--out={tmp_path / 'a'}", "--rows=10",
                    "--source_rows=101")
  assert result.returncode == 2 and "--source_rows=101" in result.stderr
  assert not (tmp_path / "a").exists()
