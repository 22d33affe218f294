"""A tiny but real open_clip model, built locally (no download), for tests and the quickstart.

`python -m eval.tiny_clip --out=DIR` writes an open_clip `local-dir` model folder:
`open_clip_config.json` ({"model_cfg", "preprocess_cfg"}) and `open_clip_model.safetensors`. It loads
exactly like a downloaded model, through `--clip_model=local-dir:DIR`. The text tower uses open_clip's
default BPE tokenizer, whose vocabulary ships inside the package, so nothing is fetched. Weights come
from a fixed seed (the same command writes the same model); they are random, so its scores mean
nothing beyond exercising the pipeline.
"""

from __future__ import annotations

import json
from pathlib import Path

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
IMAGE_SIZE = 32
MODEL_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 1, "width": 32, "head_width": 16,
                   "patch_size": 8},
    # open_clip's SimpleTokenizer has 49408 tokens; the text tower must have them all.
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
PREPROCESS_CFG = {"size": IMAGE_SIZE, "mode": "RGB", "mean": [0.48145466, 0.4578275, 0.40821073],
                  "std": [0.26862954, 0.26130258, 0.27577711], "interpolation": "bicubic",
                  "resize_mode": "shortest"}


def write(out: str | Path, model, model_cfg: dict, preprocess_cfg: dict = PREPROCESS_CFG) -> str:
  """Writes an open_clip.CLIP built from `model_cfg` as a local-dir folder; returns the
  --clip_model value that loads it."""
  from safetensors.torch import save_file
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / WEIGHTS_FILE))
  (out / CONFIG_FILE).write_text(json.dumps({"model_cfg": model_cfg,
                                              "preprocess_cfg": preprocess_cfg}, indent=2))
  return f"local-dir:{out}"


def save(out: str | Path, seed: int = 0, model_cfg: dict = MODEL_CFG) -> str:
  """Writes a model with random weights from `seed`; returns the --clip_model value."""
  import open_clip
  import torch
  torch.manual_seed(seed)
  return write(out, open_clip.CLIP(**model_cfg), model_cfg)


if __name__ == "__main__":
  from absl import flags

  from sae_jax import cli

  # Flags only when run as a command: tests import save() next to other commands' flags.
  _OUT = flags.DEFINE_string("out", None, "Folder to write the model to.", required=True)
  _SEED = flags.DEFINE_integer("seed", 0, "Seed of the random weights.")

  def main():
    print(json.dumps({"out": _OUT.value, "clip_model": save(_OUT.value, _SEED.value)}))

  cli.run(main)
