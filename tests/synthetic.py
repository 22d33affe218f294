"""Synthetic activation stores for the trainer tests: sparse positive mixtures of a few directions."""

import numpy as np

from sae_jax.store import META_DTYPE, StoreWriter


def write_sparse_store(path, *, num_shards: int, d_model: int = 16, rows_per_shard: int = 256,
                       num_directions: int = 24, seed: int = 0):
  """Each row: exponential coefficients on ~15% of `num_directions` random directions, an offset
  of 3 and a little noise. Returns `path`."""
  rng = np.random.default_rng(seed)
  directions = rng.normal(size=(num_directions, d_model))
  writer = StoreWriter(path, {"model": "synthetic", "hookpoint": "model.layers.3", "layer": 3,
                              "d_model": d_model, "dtype": "float32", "settings": {}})
  for i in range(num_shards):
    shape = (rows_per_shard, num_directions)
    coef = rng.exponential(size=shape) * (rng.random(shape) < 0.15)
    acts = coef @ directions + 3.0 + 0.01 * rng.normal(size=(rows_per_shard, d_model))
    meta = np.zeros(rows_per_shard, META_DTYPE)
    meta["image_id"], meta["patch"] = i, np.arange(rows_per_shard)
    writer.write_shard(acts.astype(np.float32), meta, [{"id": i}], num_inputs=1)
  writer.finish()
  return path
