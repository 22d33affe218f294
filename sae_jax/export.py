r"""Exports a trained dictionary for PyTorch consumers.

  python -m sae_jax.export --workdir=WORKDIR --out=EXPORT --format=sparsify
  python -m sae_jax.export --workdir=WORKDIR --out=EXPORT --format=saelens --dtype=bfloat16

Writes EXPORT/<hookpoint>/ in the chosen layout (docs/formats.md), loadable unchanged by EleutherAI
sparsify and the paper's code (`Sae.load_from_disk`) or by SAELens (`SAE.load_from_disk`), plus a
sidecar `sae_jax.json` with provenance, metrics and the training config. Any input scaling used in
training is folded into the weights, so the export acts on raw activations. A BatchTopK run exports
as a JumpReLU with its learned threshold on every latent (SAELens layout only: sparsify has no
threshold); a Matryoshka TopK run is a plain TopK at inference. One format per folder: writing one
layout over the other is refused (a reader could not tell which weights are meant).

The SAELens layout is ready to publish: EXPORT/pretrained_saes.yaml is the folder's entry for
SAELens's registry (--release, --hf_repo) and EXPORT/README.md its Hugging Face model card, both
listing every dictionary exported into EXPORT (sae_jax/formats/model_card.py); --evals adds evaluation
results (e.g. eval.sae_quality --out) to this dictionary's sidecar and card.
"""

from __future__ import annotations

import json
from pathlib import Path

from absl import flags
import numpy as np

from sae_jax import architectures, cli, logs
from sae_jax.formats import dictionary, model_card
from sae_jax.training import checkpoint

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir to export.", required=True)
_OUT = flags.DEFINE_string("out", None, "Export folder (EXPORT/<hookpoint>/ is written).",
                           required=True)
_FORMAT = flags.DEFINE_enum("format", "sparsify", ["sparsify", "saelens"], "Layout to write.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", sorted(dictionary.DTYPES), "Tensor dtype.")
_HOOKPOINT = flags.DEFINE_string(
    "hookpoint", None, "Folder name of the dictionary (default: the store's hookpoint, e.g. "
    "model.language_model.layers.24; the paper's code expects model.layers.24).")

_RELEASE = flags.DEFINE_string("release", None, "SAELens release name of the folder (saelens "
                               "format; default: llava-sae-<name of --out>).")
_HF_REPO = flags.DEFINE_string("hf_repo", None, "Hugging Face repo the folder is uploaded to, for "
                               "the registry entry (default: a placeholder HF_USER/<release>).")
_EVALS = flags.DEFINE_list("evals", [], "JSON files of evaluation results of this dictionary "
                           "(e.g. eval.sae_quality --out), recorded in its sidecar and card.")


def read_evals(paths: list[str]) -> dict:
  evals = {}
  for path in map(Path, paths):
    try:
      evals[path.stem] = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
      raise dictionary.DictionaryError(f"--evals: cannot read {path}: {e}") from None
  return evals


def last_metrics(workdir: Path) -> dict:
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return {}
  lines = [line for line in path.read_text().splitlines() if line.strip()]
  return json.loads(lines[-1]) if lines else {}


def main():
  logs.quiet_libraries()
  workdir = Path(_WORKDIR.value)
  model, run, step = checkpoint.load_model(workdir, _STEP.value)
  params = architectures.from_training(
      {name: np.asarray(getattr(model, name)[...]) for name in architectures.model_variables(run)},
      run, step)
  jumprelu = dictionary.THRESHOLD in params
  hookpoint = _HOOKPOINT.value or run["source"]["hookpoint"]
  evals = read_evals(_EVALS.value)
  folder = dictionary.write(
      _OUT.value, hookpoint, params, k=None if jumprelu else run["sae"]["k"], layout=_FORMAT.value,
      dtype=_DTYPE.value, multi_topk=run["sae"]["multi_topk"],
      sidecar={"format": "sae_jax-export", "version": 1, "layout": _FORMAT.value, "step": step,
               "workdir": str(workdir.absolute()), "input_scale_folded": run["input_scale"],
               "sae": run["sae"], "source": run["source"], "metrics": last_metrics(workdir),
               "training_flags": checkpoint.read_flags(workdir), "evals": evals})
  if _FORMAT.value == "saelens":
    release = _RELEASE.value or f"llava-sae-{Path(_OUT.value).absolute().name}"
    model_card.write(_OUT.value, release, _HF_REPO.value or f"HF_USER/{release}")
  print(json.dumps({"export": str(folder), "layout": _FORMAT.value, "step": step,
                    "num_latents": int(params["W_enc"].shape[0]), "d_in": int(params["W_enc"].shape[1]),
                    "architecture": "jumprelu" if jumprelu else "topk", "k": run["sae"]["k"],
                    "dtype": _DTYPE.value}))


if __name__ == "__main__":
  # e.g. --workdir is no training workdir, --out already holds the other format
  cli.run(main, (dictionary.DictionaryError, FileNotFoundError))
