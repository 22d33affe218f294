r"""Finds the top-activating images of every latent: one encoder pass over a store.

  python -m sae_jax.scan --sae=EXPORT_OR_WORKDIR --store=STORE --out=TOPACTS [--top_n=5 --score=mean]

Per latent it keeps the top-N images by score (the paper's mean activation over the base-grid
patches, or the max), each with its per-patch activation map, plus the firing density and a
histogram of activation values. Memory is bounded by latents x N, never by rows x latents:

- on the device, per chunk of whole images: encode, scatter the top-k values into per-image
  scores [images, n], merge them with the running top-N ([n, N + images] -> top_k), count firings
  and histogram bins;
- on the host, only the (latent, image) pairs that entered a top-N get their patch map, built from
  the chunk's sparse codes.

The scan saves its state to TOPACTS every --save_every chunks (atomically) and a rerun resumes.
The output format is in docs/formats.md.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from absl import app, flags
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from sae_jax import checkpoint, dictionary, logs
from sae_jax.model import SAEConfig, TopKSAE
from sae_jax.store import KIND_IMAGE_BASE, Store, atomic_write_json

FORMAT_NAME = "sae-topacts"

_SAE = flags.DEFINE_string("sae", None, "An export folder (sparsify or SAELens layout) or a "
                           "training workdir.", required=True)
_STORE = flags.DEFINE_string("store", None, "Store to scan (any store with the same d_model).",
                             required=True)
_OUT = flags.DEFINE_string("out", None, "TOPACTS folder to write.", required=True)
_TOP_N = flags.DEFINE_integer("top_n", 5, "Images kept per latent.", lower_bound=1)
_SCORE = flags.DEFINE_enum("score", "mean", ["mean", "max"],
                           "Image score: mean (the paper) or max over the base-grid patches.")
_CHUNK_IMAGES = flags.DEFINE_integer("chunk_images", 16, "Images encoded per device call.",
                                     lower_bound=1)
_HIST_EDGES = flags.DEFINE_list("hist_edges", ["-3", "3", "48"], "log10 of the first and last "
                                "histogram edge, and the number of bins.")
_SAVE_EVERY = flags.DEFINE_integer("save_every", 200, "Save the scan state every this many "
                                   "chunks (resume point).", lower_bound=1)
_COMPUTE_DTYPE = flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"],
                                   "Encoder matmul dtype.")
_DEBUG_KILL_AFTER_SAVES = flags.DEFINE_integer(
    "debug_kill_after_saves", 0, "Fault injection for tests: SIGKILL this process after this "
    "many intermediate saves.", lower_bound=0)


def load_sae(path: str, compute_dtype: str) -> tuple[TopKSAE, dict]:
  """A TopKSAE acting on raw activations, from an export folder or a training workdir."""
  if checkpoint.read_run(path) is not None:
    model, run, step = checkpoint.load_model(path)
    params = {n: np.asarray(getattr(model, n)[...]) for n in dictionary.PARAM_NAMES}
    params = dictionary.fold_input_scale(params, run["input_scale"])
    k, source = run["sae"]["k"], {"workdir": str(path), "step": step}
  else:
    params, info = dictionary.read(path)
    k, source = info["k"], {"export": info["folder"]}
  n, d = params["W_enc"].shape
  cfg = SAEConfig(d_in=d, num_latents=n, k=k, compute_dtype=compute_dtype)
  model = TopKSAE(cfg, rngs=nnx.Rngs(0))
  for name, value in params.items():
    getattr(model, name)[...] = jnp.asarray(value)
  return model, {"k": k, **source}


def image_chunks(store: Store, chunk_images: int, start_image: int):
  """Yields (first image id, rows [r, d], local image index [r], patch [r]) per chunk of images.

  Only base-grid patch rows count. Relies on a store holding each image's rows contiguously and
  in image-id order, which `harvest` guarantees.
  """
  for _, acts, meta in store.iter_shards():
    base = np.flatnonzero(meta["kind"] == KIND_IMAGE_BASE)
    if base.size == 0:
      continue
    ids = meta["image_id"][base]
    for first in range(max(int(ids[0]), start_image), int(ids[-1]) + 1, chunk_images):
      lo, hi = np.searchsorted(ids, [first, first + chunk_images])
      if hi > lo:
        sel = base[lo:hi]
        yield first, np.asarray(acts[sel], np.float32), ids[lo:hi] - first, meta["patch"][sel]


def make_chunk_step(model: TopKSAE, top_n: int, chunk_images: int, score: str,
                    edges: jax.Array, grid_size: int):
  graphdef, params = nnx.split(model)
  n = model.cfg.num_latents

  @jax.jit
  def step(params, state, x, image, valid, first_image):
    values, indices = nnx.merge(graphdef, params).encode(x)
    values = jnp.where(valid[:, None], values, 0.0)
    rows = jnp.broadcast_to(image[:, None], indices.shape)
    if score == "mean":
      scores = jnp.zeros((chunk_images, n)).at[rows, indices].add(values) / grid_size
    else:
      scores = jnp.zeros((chunk_images, n)).at[rows, indices].max(values)
    # The running top-N of each latent merged with this chunk's images.
    merged = jnp.concatenate([state["scores"], scores.T], axis=1)
    chunk_ids = jnp.broadcast_to(first_image + jnp.arange(chunk_images), (n, chunk_images))
    ids = jnp.concatenate([state["images"], chunk_ids], axis=1)
    top_scores, pos = jax.lax.top_k(merged, top_n)
    top_images = jnp.where(top_scores > 0, jnp.take_along_axis(ids, pos, 1), -1)
    fired = (values > 0) & valid[:, None]
    bins = jnp.clip(jnp.searchsorted(edges, values, side="right") - 1, 0, edges.size - 2)
    return {
        "scores": jnp.where(top_images >= 0, top_scores, 0.0), "images": top_images,
        "fires": state["fires"].at[indices].add(fired.astype(jnp.int32)),
        "hist": state["hist"].at[indices, bins].add(fired.astype(jnp.int32)),
    }, values, indices

  return params, step


def main(argv):
  del argv
  logs.quiet_libraries()
  out = Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  store = Store(_STORE.value)
  model, sae_info = load_sae(_SAE.value, _COMPUTE_DTYPE.value)
  n, top_n, chunk = model.cfg.num_latents, _TOP_N.value, _CHUNK_IMAGES.value
  if model.cfg.d_in != store.d_model:
    raise app.UsageError(f"--sae has d_in={model.cfg.d_in} but --store={_STORE.value} has "
                         f"d_model={store.d_model}")
  images = store.images()
  grids = {tuple(r["grid"]) for r in images if "grid" in r}
  if len(grids) != 1:
    raise app.UsageError(f"--store={_STORE.value}: images have base grids {sorted(grids)}; the "
                         "scan needs one base grid")
  grid = next(iter(grids))
  grid_size = grid[0] * grid[1]
  lo, hi, num_bins = (float(v) for v in _HIST_EDGES.value)
  edges = np.logspace(lo, hi, int(num_bins) + 1).astype(np.float32)

  header = {"format": FORMAT_NAME, "version": 1, "num_latents": n, "top_n": top_n,
            "score": _SCORE.value, "grid": list(grid), "store": str(Path(_STORE.value).absolute()),
            "sae": str(Path(_SAE.value).absolute()), "k": sae_info["k"],
            "hist_edges": edges.tolist()}
  state, maps, done_images, rows_scanned = resume_or_init(out, header, n, top_n, len(edges) - 1,
                                                          grid_size)
  params, chunk_step = make_chunk_step(model, top_n, chunk, _SCORE.value, jnp.asarray(edges),
                                       grid_size)
  device_state = jax.tree.map(jnp.asarray, state)
  total = len(images)
  progress = tqdm(total=total, initial=done_images, unit="img", dynamic_ncols=True)
  start_time, start_rows = time.perf_counter(), rows_scanned
  chunks_since_save = saves = 0
  for first, x, image, patch in image_chunks(store, chunk, done_images):
    rows = len(x)
    pad = -rows % 64  # few distinct shapes: few compilations
    x = np.pad(x, ((0, pad), (0, 0)))
    valid = np.arange(rows + pad) < rows
    image_p = np.pad(image, (0, pad))
    old_images = np.asarray(device_state["images"])
    device_state, values, indices = chunk_step(params, device_state, x, image_p, valid,
                                               np.int32(first))
    update_maps(maps, old_images, np.asarray(device_state["images"]), first,
                np.asarray(values)[:rows], np.asarray(indices)[:rows], image, patch)
    rows_scanned += rows
    done_images = first + int(image[-1]) + 1  # a chunk ends early at a shard boundary
    progress.update(done_images - progress.n)
    progress.set_postfix(rows=rows_scanned, refresh=False)
    chunks_since_save += 1
    if chunks_since_save == _SAVE_EVERY.value:
      save(out, header, device_state, maps, done_images, rows_scanned, complete=False)
      chunks_since_save = 0
      saves += 1
      if saves == _DEBUG_KILL_AFTER_SAVES.value:
        os.kill(os.getpid(), signal.SIGKILL)
  progress.close()
  save(out, header, device_state, maps, total, rows_scanned, complete=True)
  with open(out / "images.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in images)
  density = np.asarray(device_state["fires"]) / max(rows_scanned, 1)
  seconds = time.perf_counter() - start_time
  print(json.dumps({"topacts": str(out), "latents": n, "images": total, "rows": rows_scanned,
                    "alive_fraction": float(np.mean(density > 0)),
                    "mean_density": float(density.mean()), "seconds": round(seconds, 3),
                    "rows_per_s": round((rows_scanned - start_rows) / max(seconds, 1e-9), 1)}))


def update_maps(maps, old_images, new_images, first_image, values, indices, image, patch):
  """Keeps maps[l, s] the patch map of image new_images[l, s], for latents whose top-N changed."""
  touched = np.flatnonzero((new_images != old_images).any(axis=1))
  if touched.size == 0:
    return
  # Images already in the top-N may have moved to another slot: their maps move with them.
  old, new = old_images[touched], new_images[touched]
  same = old[:, None, :] == new[:, :, None]  # [touched, new slot, old slot]
  moved = np.take_along_axis(maps[touched], same.argmax(axis=2)[..., None], axis=1)
  maps[touched] = np.where(same.any(axis=2)[..., None] & (new >= 0)[..., None], moved, 0.0)
  # Images of this chunk that entered a top-N get their map from the chunk's sparse codes.
  latent, slot = np.nonzero(new_images >= first_image)
  if latent.size == 0:
    return
  n = maps.shape[0]
  wanted = (new_images[latent, slot] - first_image).astype(np.int64) * n + latent
  order = np.argsort(wanted)
  wanted_sorted = wanted[order]
  keys = image[:, None].astype(np.int64) * n + indices  # (local image, latent) of each code
  pos = np.minimum(np.searchsorted(wanted_sorted, keys), len(wanted_sorted) - 1)
  rows, cols = np.nonzero((wanted_sorted[pos] == keys) & (values > 0))
  entry = order[pos[rows, cols]]
  maps[latent[entry], slot[entry], patch[rows]] = values[rows, cols]


def resume_or_init(out: Path, header: dict, n: int, top_n: int, bins: int, grid_size: int):
  meta_path = out / "topacts.json"
  if meta_path.exists():
    saved = json.loads(meta_path.read_text())
    if {k: saved.get(k) for k in header} != header:
      raise app.UsageError(f"{out} holds a scan with other settings; use another --out")
    state = {"scores": np.load(out / "top_scores.npy"), "images": np.load(out / "top_images.npy"),
             "fires": np.load(out / "fires.npy"), "hist": np.load(out / "histogram.npy")}
    maps = np.load(out / "top_maps.npy").astype(np.float32)
    return state, maps, saved["images_scanned"], saved["rows_scanned"]
  state = {"scores": np.zeros((n, top_n), np.float32), "images": np.full((n, top_n), -1, np.int32),
           "fires": np.zeros((n,), np.int32), "hist": np.zeros((n, bins), np.int32)}
  return state, np.zeros((n, top_n, grid_size), np.float32), 0, 0


def save(out: Path, header: dict, state, maps, images_scanned: int, rows_scanned: int, *,
         complete: bool) -> None:
  host = jax.device_get(state)
  arrays = {"top_scores.npy": host["scores"], "top_images.npy": host["images"].astype(np.int64),
            "top_maps.npy": maps.astype(np.float16), "fires.npy": host["fires"],
            "histogram.npy": host["hist"].astype(np.int64),
            "density.npy": host["fires"] / max(rows_scanned, 1)}
  for name, array in arrays.items():
    tmp = out / f".{name}.tmp"
    with open(tmp, "wb") as f:
      np.save(f, array, allow_pickle=False)
    os.replace(tmp, out / name)
  atomic_write_json(out / "topacts.json", {**header, "images_scanned": images_scanned,
                                           "rows_scanned": rows_scanned, "complete": complete})


if __name__ == "__main__":
  app.run(main)
