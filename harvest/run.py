"""The harvest: images + prompts -> LLaVA forward passes with hooks -> one activation store per layer.

Three stages overlap: a prefetch thread decodes images and runs the processor, the main thread runs
the forward pass, and a writer thread checks the rows and commits shards. Output layout:

  OUT/layer_<L>/          an activation store (sae_jax.store) for decoder layer L
  OUT/harvest_flags.json  the resolved settings of the last run

With --num_workers=N each worker harvests its slice of the inputs into OUT/layer_<L>/parts/ and
the last one to finish commits the parts as one store (sae_jax.store.parts).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Iterable, Iterator

import numpy as np
import torch
import tqdm

from harvest import hooks, images, llava, pipeline, tokens
from harvest.shards import BatchRows, ShardAssembler, ShardEnd
from sae_jax.data.prefetch import prefetch
from sae_jax.store import StoreWriter, join, open_location, parts
from sae_jax.files import json_bytes

FLAGS_FILE = "harvest_flags.json"
# Batches prepared ahead / waiting to be written: enough to hide either stage, little memory.
PREFETCH_DEPTH = 2
WRITE_QUEUE_DEPTH = 4


class HarvestError(ValueError):
  """Settings or inputs that make the harvest impossible."""


@dataclasses.dataclass(frozen=True)
class HarvestConfig:
  """Everything `python -m harvest` takes; field names are the flag names."""
  model: str
  layers: tuple[int, ...]
  images: str
  out: str
  image_column: str = "image"
  split: str = "train"
  prompt_mode: str = "bare"
  prompt: str = ""
  tokens: str = "base_patches"
  dtype: str = "float32"
  store_dtype: str = "bfloat16"
  device: str = "auto"
  batch_size: int = 8
  shard_images: int = 128
  max_images: int = 0
  on_bad_image: str = "skip"
  max_image_pixels: int = images.DEFAULT_MAX_PIXELS
  stop_after_last_layer: bool = True
  num_workers: int = 1
  worker_index: int = 0

  def validate(self) -> None:
    if not self.layers:
      raise HarvestError("--layers is empty")
    if len(set(self.layers)) != len(self.layers):
      raise HarvestError(f"--layers={','.join(map(str, self.layers))} repeats a layer")
    if self.shard_images % self.batch_size:
      raise HarvestError(f"--shard_images={self.shard_images} is not a multiple of "
                         f"--batch_size={self.batch_size}; shards must end on batch boundaries")
    if self.tokens not in tokens.TOKEN_MODES:
      raise HarvestError(f"--tokens={self.tokens} is not one of {sorted(tokens.TOKEN_MODES)}")
    if not 0 <= self.worker_index < self.num_workers:
      raise HarvestError(f"--worker_index={self.worker_index} is not in [0, --num_workers="
                         f"{self.num_workers})")
    if self.max_image_pixels < 1:
      raise HarvestError(f"--max_image_pixels={self.max_image_pixels} is not positive")

  def content_settings(self) -> dict:
    """The settings that decide what a store holds (device and threading do not)."""
    skip = {"layers", "out", "device", "stop_after_last_layer", "num_workers", "worker_index"}
    return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


@dataclasses.dataclass
class EncodedBatch:
  inputs: dict  # processor outputs, on the CPU
  batch_index: np.ndarray  # [rows]: which input of the batch each selected row comes from
  meta: np.ndarray  # [rows] of META_DTYPE
  images: list[dict]  # image table records


def encoded_batches(config: HarvestConfig, inputs, loaded: llava.LoadedModel, start: int,
                    stop: int, first_image_id: int, first_input: int = 0
                    ) -> Iterator[EncodedBatch | ShardEnd]:
  """Encoded batches of good images, and a ShardEnd after each `shard_images` inputs (shards
  numbered from `first_input`, where this worker's slice begins)."""
  image_id = first_image_id
  view = tokens.view_of_processor(loaded.processor.image_processor)
  for shard_start in range(start, stop, config.shard_images):
    shard_stop = min(shard_start + config.shard_images, stop)
    bad, pending = [], []

    def encode_pending() -> EncodedBatch:
      nonlocal image_id
      ids = np.arange(image_id, image_id + len(pending))
      image_id += len(pending)
      texts = [llava.prompt_text(loaded.processor, config.prompt_mode, prompt)
               for _, _, prompt in pending]
      encoded = llava.encode_batch(loaded.processor, [image for _, image, _ in pending], texts)
      batch_index, meta = tokens.select_tokens(
          encoded["input_ids"].numpy(), encoded["attention_mask"].numpy(), ids, loaded.layout,
          config.tokens)
      prompt_tokens = tokens.text_tokens(encoded["input_ids"].numpy(),
                                         encoded["attention_mask"].numpy(), loaded.layout)
      records = [{"id": int(i), "source": inputs.source(n), "prompt": text,
                  "grid": list(loaded.layout.grid), "view": view, "text_tokens": pairs}
                 for i, (n, _, _), text, pairs in zip(ids, pending, texts, prompt_tokens)]
      pending.clear()
      return EncodedBatch(encoded, batch_index, meta, records)

    for n in range(shard_start, shard_stop):
      try:
        image = inputs.load(n)
      except images.BadImage as e:
        if config.on_bad_image == "fail":
          raise HarvestError(f"input {n} ({inputs.source(n)}): {e} "
                             "(--on_bad_image=skip leaves such images out)") from e
        bad.append({"input": n, "source": inputs.source(n), "error": str(e)})
        continue
      pending.append((n, image, inputs.prompt(n) or config.prompt))
      if len(pending) == config.batch_size:
        yield encode_pending()
    if pending:
      yield encode_pending()
    yield ShardEnd(index=(shard_start - first_input) // config.shard_images,
                   num_inputs=shard_stop - shard_start,
                   bad_images=bad)


def store_path(config: HarvestConfig, layer: int):
  """OUT/layer_<L>: a Path, or a gs:// or s3:// URL."""
  return join(config.out, f"layer_{layer}")


def open_stores(config: HarvestConfig, loaded: llava.LoadedModel, settings: dict
                ) -> dict[int, StoreWriter]:
  """One store writer per layer, OUT/layer_<L> (this worker's part of it with several workers);
  resolves the hookpoints (unknown layer: error)."""
  hookpoints = hooks.resolve_layers(loaded.model, config.layers)
  part = ((parts.PARTS_DIR, parts.part_name(config.worker_index, config.num_workers))
          if config.num_workers > 1 else ())
  return {layer: StoreWriter(join(store_path(config, layer), *part), {
      "model": config.model, "hookpoint": hookpoints[layer], "layer": layer,
      "d_model": loaded.d_model, "dtype": config.store_dtype, "settings": settings})
      for layer in config.layers}


def record(config: HarvestConfig, loaded: llava.LoadedModel, items: Iterable,
           writers: dict[int, StoreWriter], bar: tqdm.tqdm) -> int:
  """Forward passes with hooks over `items`, rows committed to `writers`; returns rows per layer.

  The writer thread checks rows and commits shards while the next forward runs.
  """
  rows = 0
  writer = pipeline.BackgroundWorker(ShardAssembler(writers), WRITE_QUEUE_DEPTH)
  try:
    with hooks.LayerCapture(loaded.model, config.layers, config.stop_after_last_layer) as capture:
      for item in items:
        if isinstance(item, ShardEnd):
          bar.update(len(item.bad_images))
          writer.submit(item)
          continue
        model_inputs = llava.to_model_inputs(loaded, item.inputs)
        with torch.inference_mode():
          captured = capture.capture(
              lambda: loaded.model(**model_inputs, use_cache=False),
              torch.as_tensor(item.batch_index, device=loaded.device),
              torch.as_tensor(item.meta["position"].astype(np.int64), device=loaded.device))
        writer.submit(BatchRows(rows=captured, meta=item.meta, images=item.images))
        rows += len(item.meta)
        bar.update(len(item.images))
        bar.set_postfix(rows_per_s=f"{rows / max(bar.format_dict['elapsed'], 1e-9):.0f}",
                        refresh=False)  # redrawn at tqdm's own pace by update()
  except BaseException:
    writer.close(raise_error=False)  # finish the shards already handed over, then fail
    raise
  writer.close()
  return rows


def harvest(config: HarvestConfig, progress: bool = True) -> dict:
  """Runs (or resumes, or finds finished) a harvest; returns the summary printed by the CLI."""
  config.validate()
  with images.pixel_limit(config.max_image_pixels):
    return _harvest(config, progress)


def _harvest(config: HarvestConfig, progress: bool) -> dict:
  began = time.perf_counter()
  inputs = images.open_inputs(config.images, config.image_column, config.split)
  stop = min(len(inputs), config.max_images) if config.max_images else len(inputs)
  loaded = llava.load_llava(config.model, config.dtype, config.device)
  settings = {**config.content_settings(), "model_type": loaded.model_type, "num_inputs": stop,
              "inputs_sha256": images.inputs_fingerprint(inputs)}
  lo, hi = parts.worker_slice(stop, config.shard_images, config.worker_index, config.num_workers)
  if config.num_workers > 1:
    settings[parts.WORKER_KEY] = {"index": config.worker_index, "count": config.num_workers,
                                  "first_input": lo, "stop_input": hi}
  writers = open_stores(config, loaded, settings)
  flags_file = (FLAGS_FILE if config.num_workers == 1 else
                f"harvest_flags.worker{config.worker_index}.json")
  open_location(config.out).write(flags_file, json_bytes({
      **dataclasses.asdict(config), "model_type": loaded.model_type,
      "hookpoints": {layer: w.header["hookpoint"] for layer, w in writers.items()},
      "resolved_device": str(loaded.device), "torch_threads": torch.get_num_threads()}))

  # Layers of one run commit shard k one after the other; a kill between them leaves some layers a
  # shard ahead, so restart at the least advanced one (the others skip what they hold).
  behind = min(writers.values(), key=lambda w: w.inputs_done)
  start = lo + behind.inputs_done
  if (start - lo) % config.shard_images and start != hi:
    raise HarvestError(f"{behind.path} ends mid-shard at input {start}; it was not written by this "
                       f"--shard_images={config.shard_images}")
  first_image_id = behind.images_done
  streamed = time.perf_counter()
  with tqdm.tqdm(total=hi - lo, initial=start - lo, unit="img", disable=not progress,
                 dynamic_ncols=True) as bar:
    rows = record(config, loaded, prefetch(
        encoded_batches(config, inputs, loaded, start, hi, first_image_id, lo), PREFETCH_DEPTH),
        writers, bar)
  # Nothing to train on: fail, and leave the stores incomplete (workers: the commit refuses).
  if behind.images_done == 0 and config.num_workers == 1:
    bad = next((b for s in behind.shards for b in s.bad_images), None)
    first = f"; input {bad['input']} ({bad['source']}): {bad['error']}" if bad else ""
    raise HarvestError(f"none of the {stop} inputs of --images={config.images} could be read"
                       f"{first}; the stores in --out={config.out} are left incomplete")
  for w in writers.values():
    if not w.complete:
      w.finish()
  # Every worker tries the commit once its part is done; the last one to finish makes it.
  committed = config.num_workers == 1 or all(
      parts.commit(store_path(config, layer), config.num_workers) for layer in config.layers)
  finished = time.perf_counter()
  images_done = behind.images_done - first_image_id
  return {
      "ok": True, "out": config.out, "layers": list(config.layers), "inputs": stop,
      "worker_index": config.worker_index, "num_workers": config.num_workers,
      "worker_inputs": [lo, hi], "committed": committed,
      "images": behind.images_done, "resumed_from_input": start,
      "bad_images": sum(len(s.bad_images) for s in behind.shards),
      "rows_per_layer": behind.rows, "shards": len(behind.shards),
      "stores": {str(layer): str(store_path(config, layer)) for layer in config.layers},
      "seconds": round(finished - began, 3), "stream_seconds": round(finished - streamed, 3),
      "images_per_s": round(images_done / (finished - streamed), 2),
      "rows_per_s": round(rows / (finished - streamed), 1)}
