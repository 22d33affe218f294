"""Writes a store of --rows rows drawn uniformly with replacement from a source store's rows.

  python benchmarks/resample_store.py --source=/tmp/s16k/store --out=/tmp/s16r8/store \
    --rows=8000000 [--source_rows=262144] [--seed=7]

Trained in one pass, it feeds a trainer i.i.d. draws from the source's rows (a row comes back at
random gaps), where passes over the source itself bring every row back once an epoch: the two
measure whether the order or the number of distinct rows moves a result (docs/benchmarks.md,
"Fresh samples need a short dead window"). `--source_rows` draws from the source's first rows
only. The source's synthetic model (`eval.synthetic write`) is copied beside the rows, so
`eval.synthetic score` scores SAEs trained on the new store. Rerunning resumes after the last
shard with the same draws. The --source_rows drawn from are held in memory, in the
source's dtype.
"""

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # eval/, as synthbench.py
from eval.synthetic import MODEL_DIR, place_model  # noqa: E402
from sae_jax.store import META_DTYPE, Store, StoreWriter  # noqa: E402
from sae_jax.store.codecs import from_disk  # noqa: E402


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--source", required=True, help="the STORE to draw rows from")
  parser.add_argument("--out", required=True, help="the new STORE")
  parser.add_argument("--rows", type=int, required=True, help="rows to draw")
  parser.add_argument("--source_rows", type=int, default=0,
                      help="draw from the source's first rows only (0: all of them)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--shard_rows", type=int, default=65_536)
  args = parser.parse_args()
  source = Store(args.source)
  pool = args.source_rows or source.rows
  if not 0 < pool <= source.rows:
    parser.error(f"--source_rows={args.source_rows}: {args.source} holds {source.rows} rows")
  last, end = source.locate(pool - 1)  # read only the shards the draws come from
  raw = np.concatenate([source.read_rows(i, 0, source.shards[i].rows) for i in range(last)]
                       + [source.read_rows(last, 0, end + 1)])
  header = {k: source.manifest[k] for k in ("model", "hookpoint", "layer", "d_model", "dtype")}
  header["settings"] = {"resampled_from": source.manifest["settings"], "source_rows": pool,
                        "with_replacement": True, "rows": args.rows, "seed": args.seed,
                        "shard_rows": args.shard_rows}
  writer = StoreWriter(args.out, header)
  model, folder = Path(args.source) / MODEL_DIR, Path(args.out) / MODEL_DIR
  if model.exists() and not folder.exists():
    place_model(folder, lambda tmp: shutil.copytree(model, tmp))
  picks = np.random.default_rng(args.seed).integers(0, pool, args.rows)
  shards = -(-args.rows // args.shard_rows)
  for index in tqdm.trange(len(writer.shards), shards, unit="shard"):
    rows = picks[index * args.shard_rows:(index + 1) * args.shard_rows]
    meta = np.zeros(len(rows), META_DTYPE)
    meta["image_id"], meta["patch"] = index, np.arange(len(rows))
    writer.write_shard(from_disk(raw[rows], source.dtype).astype(np.float32), meta,
                       [{"id": index, "source": "resampled"}], num_inputs=1)
  writer.finish()
  print(f"{args.out}: {writer.rows} rows drawn from {pool} of {args.source}")


if __name__ == "__main__":
  main()
