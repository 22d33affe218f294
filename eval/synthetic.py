"""`python -m eval.synthetic`: SynthSAEBench (SAELens's synthetic benchmark) as a store and a score.

  python -m eval.synthetic write --model=small --rows=1000000 --out=STORE [--dtype=float16]
  python -m sae_jax.train --store=STORE --workdir=RUN ...
  python -m sae_jax.export --workdir=RUN --out=EXPORT --format=saelens
  python -m eval.synthetic score --sae=EXPORT --store=STORE [--l0=K] [--out=SCORE.json]

`write` builds a SAELens SyntheticModel (`--model`: MODELS below) and writes --rows of its samples
as an ordinary activation STORE (docs/formats.md), one shard of --shard_rows at a time (a killed
write resumes after its last shard, with the same rows: each shard has its own seed), and saves
the model beside the rows in STORE/synthetic_model/ (SAELens's own safetensors + JSON files).
`--model_from=STORE` takes the model of a store written before instead of building it, so a
bigger store of the same model starts with the same rows.

`score` loads an EXPORT (SAELens layout; a BatchTopK export is a JumpReLU) with SAELens, rebuilds
the store's synthetic model and prints SAELens's own metrics (eval_sae_on_synthetic_data, on
--samples fresh samples of the model, never rows of the store: SCORE_SEEDS below): MCC, F1,
precision, recall, uniqueness, explained variance, L0 (and the model's true L0), dead latents,
shrinkage. One JSON line; --out writes it too. F1, precision and recall move with the L0, so
compare SAEs at one L0: `--l0=K` scores a JumpReLU export with its thresholds scaled by the one
factor that gives mean L0 K on --calibration_samples other fresh samples.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

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
# Three streams of seeds, so that no sample is in two of them: `write` seeds its shards in
# [0, 2^31), `score --l0` its calibration samples in [2^31, 2^31 + 2^30) and `score` its scored
# samples above. Torch's CPU generator is seeded with a seed's low 32 bits only, so each stream
# stays below 2^32.
CALIBRATION_SEEDS, SCORE_SEEDS = 2 ** 31, 2 ** 31 + 2 ** 30


def shard_seed(seed: int, index: int) -> int:
  value = seed * 1_000_003 + index
  if not 0 <= value < CALIBRATION_SEEDS:
    raise StoreError(f"--seed={seed} is out of range: shard seeds lie in [0, 2^31)")
  return value


def stream_seed(stream: int, seed: int) -> int:
  if not 0 <= seed < 2 ** 30:
    raise StoreError(f"--seed={seed} is out of range: [0, 2^30)")
  return stream + seed


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


def place_model(folder: Path, fill: Callable[[Path], object]) -> None:
  """`fill(tmp)` writes the model's files into a temporary folder renamed to `folder`: whole or
  absent."""
  tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
  shutil.rmtree(tmp, ignore_errors=True)
  fill(tmp)
  os.replace(tmp, folder)


def load_model(store: str | Path, device: str = "cpu") -> SyntheticModel:
  folder = Path(store) / MODEL_DIR
  if not (folder / "synthetic_model_config.json").exists():
    raise StoreError(f"{store} was not written by `eval.synthetic write`: "
                     f"{folder}/synthetic_model_config.json is missing")
  return SyntheticModel.load_from_disk(folder, device=device)


def write_store(out: str | Path, config: SyntheticModelConfig, rows: int, *, dtype: str = "float32",
                shard_rows: int = 65_536, seed: int = 0, name: str = "custom",
                progress: bool = True, device: str = "cpu",
                model_from: str | Path | None = None) -> Path:
  """Writes `rows` samples of the model `config` defines as a STORE at `out` (resuming one that a
  killed write left), the model beside them. Returns `out`.

  `model_from`, a store written by `write`, lends its model instead of building one (its files
  copied as they are; it must be the model `config` defines): a store of more rows of the same
  model, without rebuilding it, and with the same rows where the seeds meet."""
  out = Path(out)
  folder = out / MODEL_DIR
  source = None  # where the model comes from; None: built here
  if folder.exists():  # a write resumed
    source = folder
  elif model_from:
    source = Path(model_from) / MODEL_DIR
  if source is not None:
    model = load_model(source.parent, device)
    if model.cfg.to_dict() != config.to_dict():
      flag = "--out" if source == folder else "--model_from"
      raise StoreError(f"{source} holds another synthetic model than --model={name}; use "
                       f"another {flag}")
  writer = StoreWriter(out, {"model": f"synthsaebench:{name}", "hookpoint": "synthetic",
                             "layer": 0, "d_model": config.hidden_dim, "dtype": dtype,
                             "settings": {"synthetic_model": config.to_dict(), "rows": rows,
                                          "shard_rows": shard_rows, "seed": seed}})
  if source is None:
    model = SyntheticModel(config, device=device)
    place_model(folder, model.save)
  elif source != folder:
    place_model(folder, lambda tmp: shutil.copytree(source, tmp))
  with tqdm.tqdm(total=rows, initial=writer.rows, unit="row", disable=not progress) as bar:
    while writer.rows < rows:
      index = len(writer.shards)
      torch.manual_seed(shard_seed(seed, index))  # a resumed shard is the one a whole run writes
      count = min(shard_rows, rows - writer.rows)
      parts = []
      for n in chunks(count, model):
        parts.append(model.sample(n).float().cpu().numpy())
        bar.update(len(parts[-1]))
      meta = np.zeros(count, META_DTYPE)
      meta["image_id"], meta["patch"] = index, np.arange(count)
      writer.write_shard(np.concatenate(parts), meta, [{"id": index, "source": "synthetic"}],
                         num_inputs=1)
  writer.finish()
  return out


def score(sae_path: str | Path, store: str | Path, *, samples: int = 100_000,
          batch_size: int = 4096, seed: int = 0, device: str = "cpu", l0: float | None = None,
          calibration_samples: int = 16_384) -> dict:
  """SAELens's SynthSAEBench metrics of the export at `sae_path` on the model beside `store`.

  With `l0`, a JumpReLU export is scored at that mean L0: its thresholds are first scaled by the
  one factor that gives that L0 on `calibration_samples` other samples of the model. F1,
  precision and recall move with the L0 (SynthSAEBench publishes them at L0 20 and 25), so SAEs
  are compared at one L0."""
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
  calibration = {}
  if l0 is not None:
    torch.manual_seed(stream_seed(CALIBRATION_SEEDS, seed))
    with torch.no_grad():
      rows = torch.cat([model.sample(n) for n in chunks(calibration_samples, model)])
    scale = l0_threshold_scale(sae, rows, l0, folder, batch_size)
    with torch.no_grad():
      sae.threshold.mul_(scale)
    calibration = {"l0_target": l0, "threshold_scale": scale,
                   "calibration_samples": calibration_samples}
  torch.manual_seed(stream_seed(SCORE_SEEDS, seed))
  result = eval_sae_on_synthetic_data(sae, model.feature_dict, model.activation_generator,
                                      num_samples=samples, batch_size=batch_size)
  c = result.classification
  return {"mcc": result.mcc, "f1": c.f1_score, "precision": c.precision, "recall": c.recall,
          "uniqueness": result.uniqueness, "explained_variance": result.explained_variance,
          "l0": result.sae_l0, "true_l0": result.true_l0, "dead_latents": result.dead_latents,
          "shrinkage": result.shrinkage, "num_latents": int(sae.W_dec.shape[0]),
          "architecture": sae.cfg.architecture(), "samples": samples, "sae": str(folder),
          "store": str(store), **calibration}


def chunks(samples: int, model: SyntheticModel) -> list[int]:
  """`samples` in draws of the size `write` draws (its dense features take ~64 MiB)."""
  size = max(1, 2 ** 24 // model.cfg.num_features)
  return [min(size, samples - start) for start in range(0, samples, size)]


def l0_threshold_scale(sae, rows: torch.Tensor, l0: float, folder: Path,
                       batch_size: int) -> float:
  """The one factor on every threshold of the JumpReLU `sae` that gives mean L0 `l0` on `rows`.
  Latent i fires where pre_i > c * threshold_i, that is where pre_i / threshold_i > c, so c lies
  between the m-th and the (m+1)-th largest of those ratios, m = round(l0 * rows): kept over
  batches of `batch_size` rows, so memory grows with the batch, not with the rows."""
  if sae.cfg.architecture() != "jumprelu":
    raise dictionary.DictionaryError(f"{folder} is a {sae.cfg.architecture()} SAE: only a "
                                     "JumpReLU's L0 can be set (a TopK's is its k); drop --l0")
  threshold = sae.threshold.detach().float()
  if not bool((threshold > 0).all()):
    raise dictionary.DictionaryError(f"{folder} has thresholds <= 0: --l0 scales positive ones")
  m = round(l0 * len(rows))
  if not 0 < m < len(rows) * len(threshold):
    raise dictionary.DictionaryError(f"--l0={l0} is out of range for the {len(threshold)} "
                                     f"latents of {folder}")
  top = torch.empty(0, device=threshold.device)
  with torch.no_grad():
    for batch in rows.split(batch_size):
      pre = sae.process_sae_in(batch.to(sae.W_enc)) @ sae.W_enc + sae.b_enc
      ratios = torch.cat([top, (pre.float() / threshold).flatten()])
      top = torch.topk(ratios, min(m + 1, ratios.numel())).values
  scale = float((top[-2] + top[-1]) / 2)
  if scale <= 0:
    raise dictionary.DictionaryError(
        f"{folder} cannot reach L0 {l0}: fewer pre-activations than that are positive per row")
  return scale


if __name__ == "__main__":
  # The flags exist only when this runs as a command: tests and benchmarks import the functions.
  _MODEL = flags.DEFINE_enum("model", "small", list(MODELS), "write: the synthetic model.")
  _ROWS = flags.DEFINE_integer("rows", 1_000_000, "write: samples to write.", lower_bound=1)
  _DTYPE = flags.DEFINE_enum("dtype", "float32", list(DTYPES), "write: the store's dtype.")
  _SHARD_ROWS = flags.DEFINE_integer("shard_rows", 65_536, "write: rows per shard.", lower_bound=1)
  _SEED = flags.DEFINE_integer("seed", 0, "write: seed of the samples; score: of the eval samples (a stream apart from "
                               "every store's rows).")
  _OUT = flags.DEFINE_string("out", None, "write: the STORE folder (required); score: also write "
                             "the JSON line to this file.")
  _SAE = flags.DEFINE_string("sae", None, "score: EXPORT folder (SAELens layout) or its hookpoint "
                             "sub-folder.")
  _STORE = flags.DEFINE_string("store", None, "score: a STORE written by `write`.")
  _SAMPLES = flags.DEFINE_integer("samples", 100_000, "score: fresh samples of the model to score "
                                  "on (SAELens's default).", lower_bound=1)
  _BATCH_SIZE = flags.DEFINE_integer("batch_size", 4096, "score: samples per batch.", lower_bound=1)
  _L0 = flags.DEFINE_float("l0", None, "score: score a JumpReLU export at this mean L0, its "
                           "thresholds scaled by the one factor that gives it on "
                           "--calibration_samples other samples (compare SAEs at one L0: F1 moves "
                           "with it).", lower_bound=0)
  _CALIBRATION_SAMPLES = flags.DEFINE_integer("calibration_samples", 16_384, "score: samples "
                                              "that --l0 calibrates on.", lower_bound=1)
  _MODEL_FROM = flags.DEFINE_string("model_from", None, "write: take the synthetic model from this "
                                    "STORE (written by `write` with the same --model) instead of "
                                    "building it (synth16k: ~30 min on a CPU).")
  _DEVICE = flags.DEFINE_string("device", "cpu", "Torch device of the generator (and of the SAE in "
                                "score), e.g. cuda: the rows are the same on any device only up to "
                                "its random numbers.")

  def write_main() -> None:
    if not _OUT.value:
      raise StoreError("write needs --out=STORE")
    out = write_store(_OUT.value, MODELS[_MODEL.value](), _ROWS.value, dtype=_DTYPE.value,
                      shard_rows=_SHARD_ROWS.value, seed=_SEED.value, name=_MODEL.value,
                      device=_DEVICE.value, model_from=_MODEL_FROM.value)
    print(json.dumps({"store": str(out), "model": _MODEL.value, "rows": Store(out).rows,
                      "dtype": _DTYPE.value}))

  def score_main() -> None:
    if not _SAE.value or not _STORE.value:
      raise StoreError("score needs --sae=EXPORT and --store=STORE")
    result = score(_SAE.value, _STORE.value, samples=_SAMPLES.value,
                   batch_size=_BATCH_SIZE.value, seed=_SEED.value, device=_DEVICE.value,
                   l0=_L0.value, calibration_samples=_CALIBRATION_SAMPLES.value)
    if _OUT.value:
      atomic_write_json(Path(_OUT.value), result)
    print(json.dumps(result))

  cli.run({"write": write_main, "score": score_main},
          (StoreError, dictionary.DictionaryError, FileNotFoundError))
