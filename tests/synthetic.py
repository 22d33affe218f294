"""Synthetic activation stores for the trainer tests: sparse positive mixtures of a few directions."""

import numpy as np

from sae_jax.store import META_DTYPE, StoreWriter


def write_store(path, acts: np.ndarray, *, num_shards: int):
  """A float32 store of `acts` [rows, d] in `num_shards` equal shards, one image each. Returns
  `path`."""
  writer = StoreWriter(path, {"model": "synthetic", "hookpoint": "model.layers.3", "layer": 3,
                              "d_model": acts.shape[1], "dtype": "float32", "settings": {}})
  for i, shard in enumerate(np.split(acts, num_shards)):
    meta = np.zeros(len(shard), META_DTYPE)
    meta["image_id"], meta["patch"] = i, np.arange(len(shard))
    writer.write_shard(shard.astype(np.float32), meta, [{"id": i}], num_inputs=1)
  writer.finish()
  return path


def write_sparse_store(path, *, num_shards: int, d_model: int = 16, rows_per_shard: int = 256,
                       num_directions: int = 24, seed: int = 0):
  """Each row: exponential coefficients on ~15% of `num_directions` random directions, an offset
  of 3 and a little noise. Returns `path`."""
  rng = np.random.default_rng(seed)
  directions = rng.normal(size=(num_directions, d_model))
  shards = []
  for _ in range(num_shards):
    shape = (rows_per_shard, num_directions)
    coef = rng.exponential(size=shape) * (rng.random(shape) < 0.15)
    shards.append(coef @ directions + 3.0 + 0.01 * rng.normal(size=(rows_per_shard, d_model)))
  return write_store(path, np.concatenate(shards), num_shards=num_shards)
