"""`python -m eval.synthetic`: SynthSAEBench (SAELens's synthetic benchmark) as a store and a score.

  python -m eval.synthetic write --model=small --rows=1000000 --out=STORE [--dtype=float16]
  python -m sae_jax.train --store=STORE --workdir=RUN ...
  python -m sae_jax.export --workdir=RUN --out=EXPORT --format=saelens
  python -m eval.synthetic score --sae=EXPORT --store=STORE [--out=SCORE.json]

`write` builds a SAELens SyntheticModel (`--model`: MODELS below) and writes --rows of its samples
as an ordinary activation STORE (docs/formats.md), one shard of --shard_rows at a time (a killed
write resumes after its last shard, with the same rows: each shard has its own seed), and saves
the model beside the rows in STORE/synthetic_model/ (SAELens's own safetensors + JSON files).

`score` loads an EXPORT (SAELens layout; a BatchTopK export is a JumpReLU) with SAELens, rebuilds
the store's synthetic model and prints SAELens's own metrics (eval_sae_on_synthetic_data, on
--samples fresh samples of the model, seeded): MCC, F1, precision, recall, uniqueness, explained
variance, L0 (and the model's true L0), dead latents, shrinkage. One JSON line; --out writes it too.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
import tqdm
from absl import flags
from sae_lens.synthetic import (FoldedNormalMagnitudeConfig, HierarchyConfig,
                                LinearMagnitudeConfig, ZipfianFiringProbabilityConfig,
                                eval_sae_on_synthetic_data)
from sae_lens.synthetic.synthetic_model import (LowRankCorrelationConfig, OrthogonalizationConfig,
                                                SyntheticModel, SyntheticModelConfig)

from sae_jax import cli
from sae_jax.formats import dictionary
from sae_jax.store import DTYPES, META_DTYPE, Store, StoreError, StoreWriter
from sae_jax.files import atomic_write_json

MODEL_DIR = "synthetic_model"  # STORE/synthetic_model/: SyntheticModel.save's files


def synthsaebench_config(num_features: int, hidden_dim: int, roots: int) -> SyntheticModelConfig:
  """SynthSAEBench-16k's published structure (SAELens docs/synth_sae_bench.md) at any size."""
  return SyntheticModelConfig(
      num_features=num_features, hidden_dim=hidden_dim,
      firing_probability=ZipfianFiringProbabilityConfig(exponent=0.5, max_prob=0.4, min_prob=5e-4),
      hierarchy=HierarchyConfig(total_root_nodes=roots, branching_factor=4, max_depth=3,
                                mutually_exclusive_portion=1.0, compensate_probabilities=True,
                                scale_children_by_parent=True),
      orthogonalization=OrthogonalizationConfig(num_steps=100, lr=3e-4),
      correlation=LowRankCorrelationConfig(rank=25, correlation_scale=0.1),
      mean_firing_magnitudes=LinearMagnitudeConfig(start=5.0, end=4.0),
      std_firing_magnitudes=FoldedNormalMagnitudeConfig(mean=0.5, std=0.5),
      bias=0.5, seed=42)


# synth16k: the published model rebuilt. small: a quarter of its features and a third of its width
# (roots scaled with the features), trains in minutes on a CPU. tiny: for tests.
MODELS = {
    "synth16k": lambda: synthsaebench_config(16_384, 768, 128),
    "small": lambda: synthsaebench_config(4096, 256, 32),
    "tiny": lambda: synthsaebench_config(256, 32, 2),
}

def save_model(model: SyntheticModel, folder: Path) -> None:
  """SyntheticModel.save into a temporary folder renamed into place: whole or absent."""
  tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
  shutil.rmtree(tmp, ignore_errors=True)
  model.save(tmp)
  os.replace(tmp, folder)


def load_model(store: str | Path, device: str = "cpu") -> SyntheticModel:
  folder = Path(store) / MODEL_DIR
  if not (folder / "synthetic_model_config.json").exists():
    raise StoreError(f"{store} was not written by `eval.synthetic write`: "
                     f"{folder}/synthetic_model_config.json is missing")
  return SyntheticModel.load_from_disk(folder, device=device)


def write_store(out: str | Path, config: SyntheticModelConfig, rows: int, *, dtype: str = "float32",
                shard_rows: int = 65_536, seed: int = 0, name: str = "custom",
                progress: bool = True, device: str = "cpu") -> Path:
  """Writes `rows` samples of the model `config` defines as a STORE at `out` (resuming one that a
  killed write left), the model beside them. Returns `out`."""
  out = Path(out)
  writer = StoreWriter(out, {"model": f"synthsaebench:{name}", "hookpoint": "synthetic",
                             "layer": 0, "d_model": config.hidden_dim, "dtype": dtype,
                             "settings": {"synthetic_model": config.to_dict(), "rows": rows,
                                          "shard_rows": shard_rows, "seed": seed}})
  folder = out / MODEL_DIR
  if folder.exists():
    model = load_model(out, device)
    if model.cfg.to_dict() != config.to_dict():
      raise StoreError(f"{folder} holds another synthetic model; use another --out")
  else:
    model = SyntheticModel(config, device=device)
    save_model(model, folder)
  chunk = max(1, min(shard_rows, 2 ** 24 // config.num_features))  # dense features: ~64 MiB
  with tqdm.tqdm(total=rows, initial=writer.rows, unit="row", disable=not progress) as bar:
    while writer.rows < rows:
      index = len(writer.shards)
      torch.manual_seed(seed * 1_000_003 + index)  # a resumed shard is the one a whole run writes
      count = min(shard_rows, rows - writer.rows)
      parts = []
      for start in range(0, count, chunk):
        parts.append(model.sample(min(chunk, count - start)).float().cpu().numpy())
        bar.update(len(parts[-1]))
      meta = np.zeros(count, META_DTYPE)
      meta["image_id"], meta["patch"] = index, np.arange(count)
      writer.write_shard(np.concatenate(parts), meta, [{"id": index, "source": "synthetic"}],
                         num_inputs=1)
  writer.finish()
  return out


def score(sae_path: str | Path, store: str | Path, *, samples: int = 100_000,
          batch_size: int = 4096, seed: int = 0, device: str = "cpu") -> dict:
  """SAELens's SynthSAEBench metrics of the export at `sae_path` on the model beside `store`."""
  from sae_lens import SAE
  manifest = Store(store).manifest
  model = load_model(store, device)
  folder = dictionary.find_dictionary(sae_path)
  if dictionary.layout_of(folder) != "saelens":
    raise dictionary.DictionaryError(f"{folder} is no SAELens-layout export (no "
                                     f"{dictionary.WEIGHTS['saelens']}); export it with "
                                     "sae_jax.export --format=saelens")
  d_in = json.loads((folder / "cfg.json").read_text()).get("d_in")
  if d_in != manifest["d_model"]:
    raise dictionary.DictionaryError(
        f"{folder / 'cfg.json'} has d_in {d_in} but {Path(store) / 'manifest.json'} has d_model "
        f"{manifest['d_model']}: the export was not trained on this store")
  sae = SAE.load_from_disk(str(folder), device=device)
  torch.manual_seed(seed)
  result = eval_sae_on_synthetic_data(sae, model.feature_dict, model.activation_generator,
                                      num_samples=samples, batch_size=batch_size)
  c = result.classification
  return {"mcc": result.mcc, "f1": c.f1_score, "precision": c.precision, "recall": c.recall,
          "uniqueness": result.uniqueness, "explained_variance": result.explained_variance,
          "l0": result.sae_l0, "true_l0": result.true_l0, "dead_latents": result.dead_latents,
          "shrinkage": result.shrinkage, "num_latents": int(sae.W_dec.shape[0]),
          "architecture": sae.cfg.architecture(), "samples": samples, "sae": str(folder),
          "store": str(store)}


if __name__ == "__main__":
  # The flags exist only when this runs as a command: tests and benchmarks import the functions.
  _MODEL = flags.DEFINE_enum("model", "small", list(MODELS), "write: the synthetic model.")
  _ROWS = flags.DEFINE_integer("rows", 1_000_000, "write: samples to write.", lower_bound=1)
  _DTYPE = flags.DEFINE_enum("dtype", "float32", list(DTYPES), "write: the store's dtype.")
  _SHARD_ROWS = flags.DEFINE_integer("shard_rows", 65_536, "write: rows per shard.", lower_bound=1)
  _SEED = flags.DEFINE_integer("seed", 0, "write: seed of the samples; score: of the eval samples.")
  _OUT = flags.DEFINE_string("out", None, "write: the STORE folder (required); score: also write "
                             "the JSON line to this file.")
  _SAE = flags.DEFINE_string("sae", None, "score: EXPORT folder (SAELens layout) or its hookpoint "
                             "sub-folder.")
  _STORE = flags.DEFINE_string("store", None, "score: a STORE written by `write`.")
  _SAMPLES = flags.DEFINE_integer("samples", 100_000, "score: fresh samples of the model to score "
                                  "on (SAELens's default).", lower_bound=1)
  _BATCH_SIZE = flags.DEFINE_integer("batch_size", 4096, "score: samples per batch.", lower_bound=1)
  _DEVICE = flags.DEFINE_string("device", "cpu", "Torch device of the generator (and of the SAE in "
                                "score), e.g. cuda: the rows are the same on any device only up to "
                                "its random numbers.")

  def write_main() -> None:
    if not _OUT.value:
      raise StoreError("write needs --out=STORE")
    out = write_store(_OUT.value, MODELS[_MODEL.value](), _ROWS.value, dtype=_DTYPE.value,
                      shard_rows=_SHARD_ROWS.value, seed=_SEED.value, name=_MODEL.value,
                      device=_DEVICE.value)
    print(json.dumps({"store": str(out), "model": _MODEL.value, "rows": Store(out).rows,
                      "dtype": _DTYPE.value}))

  def score_main() -> None:
    if not _SAE.value or not _STORE.value:
      raise StoreError("score needs --sae=EXPORT and --store=STORE")
    result = score(_SAE.value, _STORE.value, samples=_SAMPLES.value,
                   batch_size=_BATCH_SIZE.value, seed=_SEED.value, device=_DEVICE.value)
    if _OUT.value:
      atomic_write_json(Path(_OUT.value), result)
    print(json.dumps(result))

  cli.run({"write": write_main, "score": score_main},
          (StoreError, dictionary.DictionaryError, FileNotFoundError))
