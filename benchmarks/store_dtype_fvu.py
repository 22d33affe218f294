"""The FVU of SAEs trained on one harvest stored in each dtype, measured on the float32 rows.

  python benchmarks/store_dtype_fvu.py --out=/tmp/dtype_fvu

The "harvest" is synthetic and shaped like a residual stream: rows are sparse non-negative
combinations of random directions, plus a shared offset, noise, and one outlier dimension ~30x the
others (LLaVA's residual stream has such dimensions, and they set an fp8 row's scale). It is
written once per store dtype; an SAE is trained on each with the same flags (sae_jax.train) and
scored on held-out float32 rows. Prints one JSON line per dtype: the stored rows' own FVU against
float32 (quantization alone), the SAE's held-out FVU, and bytes per row.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from sae_jax.formats import dictionary
from sae_jax.store import META_DTYPE, Store, StoreWriter, disk_dtype, disk_width

DTYPES = ("float32", "float16", "bfloat16", "float8_e4m3fn")


def rows(rng, directions, n: int) -> np.ndarray:
  coef = rng.exponential(size=(n, len(directions))) * (rng.random((n, len(directions))) < 0.02)
  x = coef @ directions + 0.5 + 0.05 * rng.normal(size=(n, directions.shape[1]))
  x[:, 7] += 30 + rng.normal(size=n)  # the outlier dimension
  return x.astype(np.float32)


def fvu(x: np.ndarray, x_hat: np.ndarray) -> float:
  return float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def reconstruct(params: dict, k: int, x: np.ndarray) -> np.ndarray:
  pre = np.maximum((x - params["b_dec"]) @ params["W_enc"].T + params["b_enc"], 0)
  keep = np.argpartition(-pre, k, axis=1)[:, :k]
  z = np.zeros_like(pre)
  np.put_along_axis(z, keep, np.take_along_axis(pre, keep, 1), 1)
  return z @ params["W_dec"] + params["b_dec"]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", required=True)
  parser.add_argument("--d_model", type=int, default=256)
  parser.add_argument("--rows", type=int, default=131072)
  parser.add_argument("--steps", type=int, default=1000)
  args = parser.parse_args()
  out = Path(args.out)
  rng = np.random.default_rng(0)
  directions = rng.normal(size=(1024, args.d_model)) / np.sqrt(args.d_model)
  train, held_out = rows(rng, directions, args.rows), rows(rng, directions, 8192)
  k = 16
  for dtype in DTYPES:
    store = out / f"store_{dtype}"
    if not (store / "manifest.json").exists():
      writer = StoreWriter(store, {"model": "synthetic", "hookpoint": "h", "layer": 0,
                                   "d_model": args.d_model, "dtype": dtype, "settings": {}})
      for i, part in enumerate(np.split(train, 8)):
        writer.write_shard(part, np.zeros(len(part), META_DTYPE), [{"id": i}], num_inputs=1)
      writer.finish()
    stored = np.concatenate([a for _, a, _ in Store(store).iter_shards()]).astype(np.float32)
    subprocess.run([sys.executable, "-m", "sae_jax.train", f"--store={store}",
                    f"--workdir={out / f'run_{dtype}'}", "--num_latents=2048", f"--k={k}",
                    "--batch_size=1024", f"--steps={args.steps}", "--lr_warmup_steps=50",
                    "--normalize_inputs", "--log_every=100"], check=True,
                   capture_output=True)
    subprocess.run([sys.executable, "-m", "sae_jax.export", f"--workdir={out / f'run_{dtype}'}",
                    f"--out={out / f'export_{dtype}'}", "--format=sparsify"], check=True,
                   capture_output=True)
    params = dictionary.read(next((out / f"export_{dtype}").iterdir()))[0]
    print(json.dumps({
        "dtype": dtype, "bytes_per_row": disk_width(dtype, args.d_model) * disk_dtype(dtype).itemsize,
        "stored_rows_fvu": round(fvu(train, stored), 7),
        "sae_fvu_held_out_float32": round(fvu(held_out, reconstruct(params, k, held_out)), 5)}),
        flush=True)


if __name__ == "__main__":
  main()
