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

A JumpReLU dictionary (a BatchTopK run, or e.g. Gemma Scope) is encoded at a fixed width, its
--max_active largest latents above threshold per row; the output counts the rows that had more.

Then one more pass over the rows that are not base-grid patches (other image tokens, text
tokens) gives each latent its modality profile and its top-N text rows (docs/formats.md, "Modality
profile"): activation mass per token kind, summed in float64 on the host, and the N text rows with
the largest activation, merged chunk by chunk from the sparse codes (memory latents x N + chunk x k).
The text rows are recorded by store row, image id and position only: sae_jax has no tokenizer,
and `interpret` decodes their context from the `text_tokens` of the store's image records. This
pass is not checkpointed: a scan killed during it repeats it when rerun.

Every --save_every chunks the whole state goes to one file, TOPACTS/scan_state.npz, replaced
atomically, and a rerun resumes from it: a kill at any moment leaves the state of one chunk
boundary, never parts of two. The output (sae_jax.formats.topacts, docs/formats.md) is written at
the end, its header last; then the state file is removed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from sae_jax import architectures, logs
from sae_jax.formats import dictionary, topacts
from sae_jax.training import checkpoint
from sae_jax.kernels import topk as topk_lib
from sae_jax.config import SAEConfig
from sae_jax.model import SparseAutoencoder
from sae_jax.store import (KIND_IMAGE_BASE, KIND_IMAGE_OTHER, KIND_TEXT, Store, StoreError,
                           absolute, from_disk)
from sae_jax.files import atomic_write_with

STATE = "scan_state.npz"


class ScanError(ValueError):
  """Inputs or an --out folder the scan cannot use; the message names the flag."""


class JumpReLU(nnx.Module):
  """The encoder of a JumpReLU dictionary (a BatchTopK SAE at inference; per-latent thresholds, as
  in Gemma Scope): pre * (pre > threshold), kept as its `cap` largest values per row (a fixed width
  for jit), largest first. TopK's zero-padding applies: a row with fewer active latents pads with 0.
  """

  def __init__(self, params: dict[str, np.ndarray], cap: int, compute_dtype: str):
    for name in ("W_enc", "b_enc", "b_dec", dictionary.THRESHOLD):
      setattr(self, name, nnx.Param(jnp.asarray(params[name], jnp.float32)))
    self.cap, self.compute_dtype = cap, compute_dtype

  def encode(self, x) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(values [B, cap], indices [B, cap], over_cap [B]): over_cap marks the rows with more than
    `cap` latents above threshold, whose smallest ones were dropped."""
    pre = topk_lib.encoder_pre(x.astype(jnp.float32) - self.b_dec[...], self.W_enc[...],
                               self.b_enc[...], jnp.dtype(self.compute_dtype))
    kept = topk_lib.jumprelu(pre, self.threshold[...])
    width = min(self.cap + 1, kept.shape[1])  # one more than the cap: does any row overflow?
    values, indices = jax.lax.top_k(kept, width)
    over_cap = values[:, self.cap] > 0 if width > self.cap else jnp.zeros(len(x), bool)
    return values[:, :self.cap], indices[:, :self.cap], over_cap


def sparse_code(model, x) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(values, indices, over_cap [B]) of either encoder (TopK never drops an active latent)."""
  if isinstance(model, JumpReLU):
    return model.encode(x)
  values, indices = model.encode(x)
  return values, indices, jnp.zeros(len(x), bool)


def load_sae(path: str, compute_dtype: str,
             max_active: int = 0) -> tuple[SparseAutoencoder | JumpReLU, dict]:
  """The dictionary's encoder acting on raw activations, from an export folder or a training
  workdir: a SparseAutoencoder, or a JumpReLU keeping at most `max_active` latents per row (0: the BatchTopK
  run's candidates per token, recorded in its run or export sidecar)."""
  if checkpoint.read_run(path) is not None:
    model, run, step = checkpoint.load_model(path)
    params = architectures.from_training(
        {n: np.asarray(getattr(model, n)[...]) for n in architectures.model_variables(run)}, run,
        step)
    sae_cfg, k, source = run["sae"], run["sae"]["k"], {"workdir": str(path), "step": step}
  else:
    params, info = dictionary.read(path)
    sae_cfg, source = info["sidecar"].get("sae"), {"export": info["folder"]}
    k = info["k"] or (sae_cfg or {}).get("k")  # a JumpReLU's: the training k, if recorded
  n, d = params["W_enc"].shape
  if dictionary.THRESHOLD not in params:
    if max_active:
      raise ScanError(f"--max_active={max_active} applies to JumpReLU dictionaries; --sae={path} "
                      "is a TopK one")
    model = SparseAutoencoder(SAEConfig(d_in=d, num_latents=n, k=k, compute_dtype=compute_dtype),
                    rngs=nnx.Rngs(0))
    for name, value in params.items():
      getattr(model, name)[...] = jnp.asarray(value)
    return model, {"architecture": "topk", "k": k, **source}
  if not max_active:
    if sae_cfg is None:
      raise ScanError(f"--sae={path} is a JumpReLU dictionary without our sidecar: give "
                      "--max_active, the most latents a row may keep")
    max_active = SAEConfig.from_record(sae_cfg).num_selected
  max_active = min(max_active, n)
  return JumpReLU(params, max_active, compute_dtype), {
      "architecture": "jumprelu", "k": k, "max_active": max_active, **source}


def image_chunks(store: Store, chunk_images: int, start_image: int):
  """Yields (first image id, rows [r, d], local image index [r], patch [r]) per chunk of images.

  Only base-grid patch rows count. Relies on a store holding each image's rows contiguously and
  in image-id order, which `harvest` guarantees; so a chunk is read as one range of rows and
  memory follows `chunk_images`, not the shard's size.
  """
  for s in store.shards:
    meta = store.shard_meta(s.index)
    base = np.flatnonzero(meta["kind"] == KIND_IMAGE_BASE)
    if base.size == 0:
      continue
    ids = meta["image_id"][base]
    for first in range(max(int(ids[0]), start_image), int(ids[-1]) + 1, chunk_images):
      lo, hi = np.searchsorted(ids, [first, first + chunk_images])
      if hi > lo:
        sel = base[lo:hi]
        acts = from_disk(store.read_rows(s.index, int(sel[0]), int(sel[-1]) + 1), store.dtype)
        yield (first, np.asarray(acts[sel - sel[0]], np.float32), ids[lo:hi] - first,
               meta["patch"][sel])


def make_chunk_step(model: SparseAutoencoder | JumpReLU, top_n: int, chunk_images: int, score: str,
                    edges: jax.Array, grid_size: int):
  graphdef, params = nnx.split(model)
  n = model.W_enc.shape[0]

  @jax.jit
  def step(params, state, x, image, valid, first_image):
    values, indices, over_cap = sparse_code(nnx.merge(graphdef, params), x)
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
        "over_cap": state["over_cap"] + jnp.sum(over_cap & valid, dtype=jnp.int32),
    }, values, indices

  return params, step


def scan(sae: str, store: str, out: str, *, top_n: int = 5, score: str = "mean",
         chunk_images: int = 16, hist_edges: tuple[float, float, int] = (-3, 3, 48),
         save_every: int = 200, compute_dtype: str = "float32", max_active: int = 0,
         progress: bool = True) -> dict:
  """Scans `store` with the dictionary at `sae` into the TOPACTS folder `out` (or resumes, or
  finds it finished); returns the summary the command line prints.

  `hist_edges`: log10 of the first and last histogram edge, and the number of bins.
  `max_active`: a JumpReLU dictionary's width cap (`load_sae`); the summary and the header then
  count the rows that had more latents above threshold than that (`rows_over_cap`).
  """
  out_path = Path(out)
  out_path.mkdir(parents=True, exist_ok=True)
  data = Store(store)
  model, sae_info = load_sae(sae, compute_dtype, max_active)
  n, d_in = model.W_enc.shape
  if d_in != data.d_model:
    raise ScanError(f"--sae={sae} has d_in={d_in} but --store={store} has "
                    f"d_model={data.d_model}")
  images = data.images()
  grids = {tuple(r["grid"]) for r in images if "grid" in r}
  if len(grids) != 1:
    raise ScanError(f"--store={store}: images have base grids {sorted(grids)}; the scan needs "
                    "one base grid")
  grid = next(iter(grids))
  grid_size = grid[0] * grid[1]
  if len(hist_edges) != 3:
    raise ScanError(f"--hist_edges={','.join(map(str, hist_edges))}: expected 3 values (log10 "
                    "of the first and last edge, number of bins)")
  lo, hi, num_bins = hist_edges
  edges = np.logspace(lo, hi, int(num_bins) + 1).astype(np.float32)

  header = {"format": topacts.FORMAT_NAME, "version": topacts.FORMAT_VERSION, "num_latents": n,
            "top_n": top_n, "score": score, "grid": list(grid),
            "store": absolute(store), "sae": str(Path(sae).absolute()),
            "k": sae_info["k"], "hist_edges": edges.tolist()}
  if "max_active" in sae_info:  # a JumpReLU; a TopK scan's header is as before
    header.update(architecture="jumprelu", max_active=sae_info["max_active"])
  resumed = resume_or_init(out_path, header, n, top_n, len(edges) - 1, grid_size)
  if resumed is None:  # finished by an earlier run
    (out_path / STATE).unlink(missing_ok=True)
    done = topacts.TopActs(out_path)
    return {**summary(out_path, done.density, len(images), done.header["rows_scanned"], 0.0, 0),
            **{key: done.header[key] for key in ("rows_over_cap",) if key in done.header}}
  state, maps, mass, done_images, rows_scanned = resumed
  params, chunk_step = make_chunk_step(model, top_n, chunk_images, score, jnp.asarray(edges),
                                       grid_size)
  device_state = jax.tree.map(jnp.asarray, state)
  bar = tqdm(total=len(images), initial=done_images, unit="img", dynamic_ncols=True,
             disable=not progress)
  start_time, start_rows = time.perf_counter(), rows_scanned
  chunks_since_save = 0
  for first, x, image, patch in image_chunks(data, chunk_images, done_images):
    rows = len(x)
    pad = -rows % 64  # few distinct shapes: few compilations
    x = np.pad(x, ((0, pad), (0, 0)))
    valid = np.arange(rows + pad) < rows
    image_p = np.pad(image, (0, pad))
    old_images = np.asarray(device_state["images"])
    device_state, values, indices = chunk_step(params, device_state, x, image_p, valid,
                                               np.int32(first))
    values, indices = np.asarray(values)[:rows], np.asarray(indices)[:rows]
    update_maps(maps, old_images, np.asarray(device_state["images"]), first, values, indices,
                image, patch)
    np.add.at(mass[:, KIND_IMAGE_BASE], indices.ravel(), values.ravel().astype(np.float64))
    rows_scanned += rows
    done_images = first + int(image[-1]) + 1  # a chunk ends early at a shard boundary
    bar.update(done_images - bar.n)
    bar.set_postfix(rows=rows_scanned, refresh=False)
    chunks_since_save += 1
    if chunks_since_save == save_every:
      save_state(out_path, header, device_state, maps, mass, done_images, rows_scanned)
      chunks_since_save = 0
  bar.close()
  host = jax.device_get(device_state)
  density = host["fires"] / max(rows_scanned, 1)
  text = text_pass(model, data, top_n, mass, progress=progress)
  over_cap = int(host["over_cap"]) + text.pop("over_cap")
  over = {"rows_over_cap": over_cap} if "max_active" in header else {}
  if over_cap:
    logging.warning("%d rows had more than --max_active=%d latents above threshold; their "
                    "smallest were dropped", over_cap, header["max_active"])
  topacts.write(out_path, {**header, "rows_scanned": rows_scanned, "images_scanned": len(images),
                           "rows_by_kind": text.pop("rows_by_kind"), **over},
                {"top_images": host["images"], "top_scores": host["scores"], "top_maps": maps,
                 "density": density, "histogram": host["hist"], "modality_mass": mass, **text},
                images)
  (out_path / STATE).unlink(missing_ok=True)
  return {**summary(out_path, density, len(images), rows_scanned,
                   time.perf_counter() - start_time, rows_scanned - start_rows), **over}


def text_pass(model: SparseAutoencoder | JumpReLU, data: Store, top_n: int, mass: np.ndarray,
              chunk_rows: int = 1024, progress: bool = False) -> dict:
  """Encodes every row that is not a base-grid patch: adds its activation to `mass` (by kind) and
  keeps each latent's top-N text rows. Returns the text arrays, the store's rows per kind and the
  number of rows over a JumpReLU's cap."""
  n = model.W_enc.shape[0]
  graphdef, params = nnx.split(model)
  encode = jax.jit(lambda params, x: sparse_code(nnx.merge(graphdef, params), x))
  over_cap = 0
  best_values = np.zeros((n, top_n), np.float32)
  best_rows = np.full((n, top_n), -1, np.int64)
  rows_by_kind = {name: 0 for name in ("image_base", "image_other", "text")}
  bar = tqdm(total=len(data.shards), unit="shard", desc="text and other image rows",
             dynamic_ncols=True, disable=not progress)
  for shard in data.shards:
    bar.update(1)
    meta = data.shard_meta(shard.index)
    for kind, name in ((KIND_IMAGE_BASE, "image_base"), (KIND_IMAGE_OTHER, "image_other"),
                       (KIND_TEXT, "text")):
      rows_by_kind[name] += int(np.sum(meta["kind"] == kind))
    sel_all = np.flatnonzero(meta["kind"] != KIND_IMAGE_BASE)
    for lo in range(0, sel_all.size, chunk_rows):
      sel = sel_all[lo:lo + chunk_rows]
      x = np.asarray(other_rows(data, shard.index, sel, chunk_rows), np.float32)
      x = np.pad(x, ((0, -len(sel) % 64), (0, 0)))
      values, indices, over = (np.asarray(a)[:len(sel)] for a in encode(params, x))
      over_cap += int(over.sum())
      kinds = meta["kind"][sel]
      for kind in (KIND_IMAGE_OTHER, KIND_TEXT):
        mine = kinds == kind
        np.add.at(mass[:, kind], indices[mine].ravel(), values[mine].ravel().astype(np.float64))
      text = np.flatnonzero(kinds == KIND_TEXT)
      if text.size == 0:
        continue
      v, i = values[text], indices[text]
      fired = v > 0
      rows = np.broadcast_to((shard.first_row + sel[text])[:, None], v.shape)[fired]
      merge_top(best_values, best_rows, i[fired], v[fired], rows)
  bar.close()
  image = np.full(best_rows.shape, -1, np.int64)
  position = np.full(best_rows.shape, -1, np.int32)
  held = best_rows >= 0
  if held.any():  # the metadata of the rows that made a top-N, shard by shard
    firsts = np.array([s.first_row for s in data.shards], np.int64)
    shard_of = np.searchsorted(firsts, best_rows[held], side="right") - 1
    found_image, found_position = np.zeros(shard_of.size, np.int64), np.zeros(shard_of.size, np.int32)
    for index in np.unique(shard_of):
      mine = shard_of == index
      meta = data.shard_meta(int(index))[best_rows[held][mine] - firsts[index]]
      found_image[mine], found_position[mine] = meta["image_id"], meta["position"]
    image[held], position[held] = found_image, found_position
  return {"top_text_rows": best_rows, "top_text_values": best_values,
          "top_text_images": image, "top_text_positions": position, "rows_by_kind": rows_by_kind,
          "over_cap": over_cap}


def other_rows(data: Store, shard: int, sel: np.ndarray, chunk_rows: int) -> np.ndarray:
  """Rows `sel` (sorted) of a shard, decoded, read in ranges of at most `chunk_rows` rows: the
  rows between them (base-grid patches) are read only where a range covers them."""
  parts, at = [], 0
  while at < len(sel):
    end = int(np.searchsorted(sel, sel[at] + chunk_rows))
    rows = data.read_rows(shard, int(sel[at]), int(sel[end - 1]) + 1)
    parts.append(from_disk(rows, data.dtype)[sel[at:end] - sel[at]])
    at = end
  return np.concatenate(parts)


def merge_top(best_values, best_rows, latents, values, rows) -> None:
  """Merges new (latent, value, row) triples into the running top-N (value, row) per latent, in
  place. Only the latents among `latents` are touched, so a chunk costs its own size, not n x N.

  Ties keep the lower store row, so the result does not depend on how rows were chunked."""
  top_n = best_values.shape[1]
  touched = np.unique(latents)
  if touched.size == 0:
    return
  old_rows = best_rows[touched]
  held = old_rows >= 0
  lat = np.concatenate([np.broadcast_to(touched[:, None], held.shape)[held], latents])
  val = np.concatenate([best_values[touched][held], values]).astype(np.float32)
  row = np.concatenate([old_rows[held], rows]).astype(np.int64)
  order = np.lexsort((row, -val, lat))
  lat, val, row = lat[order], val[order], row[order]
  rank = np.arange(lat.size) - np.searchsorted(lat, lat)  # rank within the latent
  keep = rank < top_n
  best_values[touched], best_rows[touched] = 0.0, -1
  best_values[lat[keep], rank[keep]] = val[keep]
  best_rows[lat[keep], rank[keep]] = row[keep]


def summary(out: Path, density: np.ndarray, images: int, rows: int, seconds: float,
            rows_now: int) -> dict:
  return {"topacts": str(out), "latents": len(density), "images": images, "rows": rows,
          "alive_fraction": float(np.mean(density > 0)), "mean_density": float(density.mean()),
          "seconds": round(seconds, 3), "rows_per_s": round(rows_now / max(seconds, 1e-9), 1)}


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
  """(state, maps, images scanned, rows scanned) to continue from; None if `out` is finished."""
  finished = out / topacts.HEADER
  if finished.exists():
    saved = json.loads(finished.read_text())
    if {k: saved.get(k) for k in header} != header:
      raise ScanError(f"--out={out} holds a scan with other settings; use another --out")
    if not saved.get("complete"):
      raise ScanError(f"--out={out} holds an unfinished scan of an older sae_jax.scan, whose "
                      "state cannot be resumed safely; delete it or use another --out")
    return None
  if not (out / STATE).exists():
    state = {"scores": np.zeros((n, top_n), np.float32),
             "images": np.full((n, top_n), -1, np.int32),
             "fires": np.zeros((n,), np.int32), "hist": np.zeros((n, bins), np.int32),
             "over_cap": np.int32(0)}
    return state, np.zeros((n, top_n, grid_size), np.float32), np.zeros((n, 3)), 0, 0
  with np.load(out / STATE, allow_pickle=False) as saved:
    if json.loads(str(saved["header"])) != header:
      raise ScanError(f"--out={out} holds a scan with other settings; use another --out")
    if "mass" not in saved.files:
      raise ScanError(f"--out={out} holds the state of an older sae_jax.scan (no modality mass); "
                      "delete it or use another --out")
    state = {name: saved[name] for name in ("scores", "images", "fires", "hist")}
    # A TopK scan's state from before the JumpReLU cap lacks the count: TopK never overflows.
    state["over_cap"] = saved["over_cap"] if "over_cap" in saved.files else np.int32(0)
    images_scanned, rows_scanned = (int(v) for v in saved["progress"])
    return (state, saved["maps"].astype(np.float32), saved["mass"].astype(np.float64),
            images_scanned, rows_scanned)


def save_state(out: Path, header: dict, state, maps, mass, images_scanned: int,
               rows_scanned: int) -> None:
  """The whole resume point in one file, replaced atomically."""
  arrays = {**jax.device_get(state), "maps": maps.astype(np.float16), "mass": mass,
            "header": np.array(json.dumps(header)),
            "progress": np.array([images_scanned, rows_scanned], np.int64)}

  def write(tmp: Path) -> None:
    with open(tmp, "wb") as f:  # np.savez given a path would append ".npz" to the temporary name
      np.savez(f, **arrays)
  atomic_write_with(out / STATE, write)


if __name__ == "__main__":
  # Flags only for the command line, so that importing the scan defines none (tests run it
  # in-process next to modules whose flags share these names).
  from absl import flags

  from sae_jax import cli

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
  _MAX_ACTIVE = flags.DEFINE_integer(
      "max_active", 0, "A JumpReLU dictionary (BatchTopK): the most latents kept per row, the "
      "largest (0: the training run's BatchTopK candidates per token, from its sidecar).",
      lower_bound=0)

  def main():
    logs.quiet_libraries()
    print(json.dumps(scan(_SAE.value, _STORE.value, _OUT.value, top_n=_TOP_N.value,
                          score=_SCORE.value, chunk_images=_CHUNK_IMAGES.value,
                          hist_edges=tuple(float(v) for v in _HIST_EDGES.value),
                          save_every=_SAVE_EVERY.value, compute_dtype=_COMPUTE_DTYPE.value,
                          max_active=_MAX_ACTIVE.value)))

  cli.run(main, (ScanError, StoreError, topacts.TopActsError, dictionary.DictionaryError))
