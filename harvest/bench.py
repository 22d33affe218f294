"""`python -m harvest.bench`: harvest throughput against its floor, the bare forward pass.

All phases see the same model, batches and inputs:
  preprocess     decoding images + processor + token selection (runs in the prefetch thread)
  bare_forward   model(**inputs) on pre-encoded batches: the floor
  record_full    the same forwards with hooks + writer thread + shard commits, all layers run
  record_stop    the same, ending each forward after the last hooked layer (the default)
  harvest        the `python -m harvest` loop after loading: prefetch thread + record_stop
Each phase runs `--repeats` times, the phases taking turns so that noise from other processes
spreads over all of them; the fastest run is kept, in wall time and in CPU time of the process (all
threads), which other processes on a shared machine disturb much less. Prints one JSON line;
`overhead` = record_full / bare_forward - 1 (hooking plus writing), `harvest_vs_serial` =
harvest / (preprocess + bare_forward) - 1 (what overlapping the input pipeline gains).
"""

from __future__ import annotations

import json
import platform
import tempfile
import time

import torch
import tqdm

from harvest import images, llava, run
from sae_jax.data.prefetch import prefetch


def _timed(fn):
  def run_and_time() -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu
  return run_and_time


def bench(config: run.HarvestConfig, repeats: int) -> dict:
  inputs = images.open_inputs(config.images, config.image_column, config.split)
  stop = min(len(inputs), config.max_images) if config.max_images else len(inputs)
  loaded = llava.load_llava(config.model, config.dtype, config.device)
  encode = lambda: run.encoded_batches(config, inputs, loaded, 0, stop, 0)
  items = list(encode())
  batches = [llava.to_model_inputs(loaded, b.inputs) for b in items
             if isinstance(b, run.EncodedBatch)]
  num_images = sum(len(b.images) for b in items if isinstance(b, run.EncodedBatch))
  rows = sum(len(b.meta) for b in items if isinstance(b, run.EncodedBatch))

  def bare_forward():
    with torch.inference_mode():
      for model_inputs in batches:
        loaded.model(**model_inputs, use_cache=False)

  def record(source, stop_after_last_layer: bool):
    def go():
      with tempfile.TemporaryDirectory() as out:
        cfg = run.HarvestConfig(**{**config.__dict__, "out": out,
                                   "stop_after_last_layer": stop_after_last_layer})
        writers = run.open_stores(cfg, loaded, settings={"bench": True})
        run.record(cfg, loaded, source(), writers, tqdm.tqdm(disable=True))
    return go

  phases = {
      "preprocess": lambda: list(encode()),
      "bare_forward": bare_forward,
      "record_full": record(lambda: items, False),
      "record_stop": record(lambda: items, True),
      "harvest": record(lambda: prefetch(encode(), run.PREFETCH_DEPTH),
                        config.stop_after_last_layer),
  }
  bare_forward()  # warm-up: first-call allocations and kernel selection
  timings = {name: [] for name in phases}
  for _ in range(repeats):
    for name, phase in phases.items():
      timings[name].append(_timed(phase)())
  wall = {name: min(w for w, _ in t) for name, t in timings.items()}
  cpu = {name: min(c for _, c in t) for name, t in timings.items()}

  def relative(seconds: dict) -> dict:
    return {
        "overhead": round(seconds["record_full"] / seconds["bare_forward"] - 1, 4),
        "stop_vs_bare": round(seconds["record_stop"] / seconds["bare_forward"] - 1, 4),
        "harvest_vs_bare": round(seconds["harvest"] / seconds["bare_forward"] - 1, 4),
        "harvest_vs_serial": round(
            seconds["harvest"] / (seconds["preprocess"] + seconds["bare_forward"]) - 1, 4),
    }

  return {
      "model": config.model, "model_type": loaded.model_type, "layers": list(config.layers),
      "tokens": config.tokens, "batch_size": config.batch_size, "images": num_images,
      "rows_per_layer": rows, "device": str(loaded.device), "torch_threads": torch.get_num_threads(),
      "cpu": platform.processor() or platform.machine(), "repeats": repeats,
      "images_per_s": {k: round(num_images / v, 1) for k, v in wall.items()},
      "rows_per_s": {k: round(rows / v, 1) for k, v in wall.items() if k != "preprocess"},
      "cpu_ms_per_image": {k: round(1000 * v / num_images, 3) for k, v in cpu.items()},
      "wall": relative(wall), "cpu_time": relative(cpu),
  }


if __name__ == "__main__":
  from absl import flags

  from harvest.flags import apply_torch_threads, config_from_flags  # and the harvest flags
  from sae_jax import cli

  _REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per phase; the fastest is reported.")

  def main():
    apply_torch_threads()
    flags.FLAGS.out = flags.FLAGS.out or "unused"  # every phase writes to a temporary folder
    print(json.dumps(bench(config_from_flags(), _REPEATS.value)))

  cli.run(main)
