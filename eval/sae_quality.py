"""`python -m eval.sae_quality`: how well an exported SAE explains a hookpoint, on held-out inputs.

  python -m eval.sae_quality --model=llava-hf/llama3-llava-next-8b-hf \
      --sae=EXPORT/model.layers.24 --images=heldout/ --tokens=all --max_images=256

On the raw activations of the selected tokens (`--tokens`, as in harvest: base_patches, image, text,
all; BOS and padding never):
  fvu            sum |x - x_hat|^2 / sum |x - mean(x)|^2 over all selected tokens
  l0             mean number of non-zero latents per token (TopK: k, unless pre-activations are 0;
                 JumpReLU: those above the threshold)
  dead_fraction  latents that never fired; dense_fraction: fired on more than --dense_threshold
Splicing at the hookpoint (the block output replaced at the selected tokens; all later layers see
it), the next-token loss on the prompt's text tokens (targets that are neither image, BOS nor
padding) and the KL(clean || spliced) of the next-token distributions at those positions, for
  clean           the model as it is
  sae             x := x_hat (the error dropped: what the SAE explains)
  sae_with_error  x := x_hat + (x - x_hat), computed in float64: bit-identical to clean (a check)
  zero            x := 0, zero-ablation of the hookpoint. For the residual stream mean-ablation is
                  the other common baseline; zero is used here, so loss_recovered reads like
                  SAELens' (which also zero-ablates).
and loss_recovered = (L_zero - L_sae) / (L_zero - L_clean). Prints a one-line JSON summary last.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import tqdm
from absl import flags

from harvest import images as images_lib
from harvest import llava, tokens
from harvest.hooks import HookError
from interpret import steering
from interpret.sae import SAE
from sae_jax import cli
from sae_jax.files import atomic_write_json

VARIANTS = ("sae", "sae_with_error", "zero")


class QualityError(ValueError):
  """Inputs that cannot be evaluated (names the flag or the input)."""


@dataclasses.dataclass
class Totals:
  """Sums over every batch, turned into metrics by `summary`."""
  num_latents: int
  tokens: int = 0
  squared_error: float = 0.0
  sum_x: np.ndarray | None = None
  sum_squared_norm: float = 0.0
  active: int = 0
  fired: np.ndarray | None = None
  targets: int = 0
  nll: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(("clean",) + VARIANTS, 0.0))
  kl: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(VARIANTS, 0.0))

  def __post_init__(self):
    self.fired = np.zeros(self.num_latents, np.int64)

  def add_activations(self, sae: SAE, x: torch.Tensor) -> None:
    """x [rows, d] float32 raw activations of the selected tokens."""
    for rows in x.split(steering.CHUNK_ROWS):
      values, indices = sae.encode(rows)
      err = rows - sae.decode(values, indices)
      self.squared_error += float((err.double() ** 2).sum())
      x64 = rows.double()
      sums = x64.sum(0).cpu().numpy()
      self.sum_x = sums if self.sum_x is None else self.sum_x + sums
      self.sum_squared_norm += float((x64 ** 2).sum())
      on = values > 0  # TopK keeps zeros when fewer than k are positive, JumpReLU pads with them
      self.active += int(on.sum())
      self.fired += np.bincount(indices[on].cpu().numpy(), minlength=self.num_latents)
      self.tokens += len(rows)

  def summary(self, dense_threshold: float) -> dict:
    if not self.tokens:
      raise QualityError("no tokens were selected (check --tokens against the prompts)")
    variance = self.sum_squared_norm - float((self.sum_x ** 2).sum()) / self.tokens
    frequency = self.fired / self.tokens
    out = {"num_tokens": self.tokens, "fvu": self.squared_error / variance,
           "l0": self.active / self.tokens,
           "dead_fraction": float((self.fired == 0).mean()),
           "dense_fraction": float((frequency > dense_threshold).mean()),
           "text_targets": self.targets}
    if self.targets:
      loss = {name: total / self.targets for name, total in self.nll.items()}
      out["loss"] = loss
      out["kl"] = {name: total / self.targets for name, total in self.kl.items()}
      gap = loss["zero"] - loss["clean"]
      out["loss_recovered"] = (loss["zero"] - loss["sae"]) / gap if gap else None
    return out


def splice(sae: SAE, variant: str, mask: torch.Tensor) -> Callable:
  """BlockEdit function replacing the block output at `mask` [B, T] by the variant's vector."""
  def edit(hidden: torch.Tensor, offset: int) -> torch.Tensor:
    del offset  # one forward pass over the whole prompt, no cache
    x = hidden[mask].float()
    if variant == "zero":
      new = torch.zeros_like(x)
    else:
      new = torch.cat([sae(rows) for rows in x.split(steering.CHUNK_ROWS)])
      if variant == "sae_with_error":
        # In float64 the sum rounds back to exactly x when cast to the model's dtype.
        new = new.double() + (hidden[mask].double() - new.double())
    out = hidden.clone()
    out[mask] = new.to(hidden.dtype)
    return out
  return edit


def capture(mask: torch.Tensor, into: list) -> Callable:
  """BlockEdit function that only records the block output at `mask` (as float32)."""
  def edit(hidden: torch.Tensor, offset: int) -> None:
    del offset
    into.append(hidden[mask].float())
  return edit


def target_log_probs(loaded: llava.LoadedModel, inputs: dict,
                     targets: torch.Tensor) -> torch.Tensor:
  """log p(next token) [n, vocab] at the positions that predict a text target (targets [B, T]).

  The LM head runs only on those rows: full [B, T, vocab] logits of an 8B LLaVA with a few thousand
  image tokens would take gigabytes.
  """
  hidden = loaded.model.model(**inputs, use_cache=False).last_hidden_state
  predicting = torch.zeros_like(targets)
  predicting[:, :-1] = targets[:, 1:]
  logits = loaded.model.get_output_embeddings()(hidden[predicting])
  return torch.log_softmax(logits.float(), dim=-1)


def text_targets(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 layout: tokens.ImageLayout) -> torch.Tensor:
  """[B, T] True where the token is a text target: real, not an image token, not BOS, not first."""
  targets = attention_mask.bool() & (input_ids != layout.image_token_id)
  targets &= input_ids != layout.bos_token_id
  targets[:, 0] = False
  return targets


def selected_tokens(encoded: dict, layout: tokens.ImageLayout, mode: str) -> torch.Tensor:
  """[B, T] mask of the `--tokens` rows, chosen exactly as harvest chooses store rows."""
  ids = encoded["input_ids"]
  batch_index, meta = tokens.select_tokens(
      ids.numpy(), encoded["attention_mask"].numpy(), np.arange(len(ids)), layout, mode)
  mask = torch.zeros(ids.shape, dtype=torch.bool)
  mask[torch.from_numpy(batch_index), torch.from_numpy(meta["position"].astype(np.int64))] = True
  return mask


@torch.no_grad()
def evaluate_batch(loaded: llava.LoadedModel, sae: SAE, layer: int, encoded: dict,
                   token_mode: str, totals: Totals) -> None:
  inputs = llava.to_model_inputs(loaded, encoded)
  mask = selected_tokens(encoded, loaded.layout, token_mode).to(loaded.device)
  targets = text_targets(inputs["input_ids"], inputs["attention_mask"], loaded.layout)
  recorded: list[torch.Tensor] = []
  with steering.BlockEdit(loaded.model, layer, capture(mask, recorded)):
    clean = target_log_probs(loaded, inputs, targets)
  totals.add_activations(sae, recorded[0])
  totals.targets += len(clean)
  labels = inputs["input_ids"][targets]
  totals.nll["clean"] -= float(clean.gather(1, labels[:, None]).sum())
  for variant in VARIANTS:
    with steering.BlockEdit(loaded.model, layer, splice(sae, variant, mask)):
      spliced = target_log_probs(loaded, inputs, targets)
    totals.nll[variant] -= float(spliced.gather(1, labels[:, None]).sum())
    totals.kl[variant] += float((clean.exp() * (clean - spliced)).sum())


def evaluate(loaded: llava.LoadedModel, sae: SAE, layer: int, inputs, *, prompt_mode: str,
             prompt: str, token_mode: str, batch_size: int, max_images: int,
             dense_threshold: float) -> dict:
  """The metrics over the first `max_images` (0: all) of a harvest.images reader."""
  count = min(len(inputs), max_images) if max_images else len(inputs)
  if not count:
    raise QualityError("--images holds no inputs")
  totals = Totals(sae.num_latents)
  for start in tqdm.tqdm(range(0, count, batch_size), desc="batches", unit="batch"):
    rows = range(start, min(start + batch_size, count))
    batch_images = []
    for i in rows:
      try:
        batch_images.append(inputs.load(i))
      except images_lib.BadImage as e:
        raise QualityError(f"--images: input {i} ({inputs.source(i)}): {e}") from e
    texts = [llava.prompt_text(loaded.processor, prompt_mode, inputs.prompt(i) or prompt)
             for i in rows]
    encoded = llava.encode_batch(loaded.processor, batch_images, texts)
    evaluate_batch(loaded, sae, layer, encoded, token_mode, totals)
  return {"images": count, **totals.summary(dense_threshold)}


if __name__ == "__main__":
  _LLAVA = llava.define_flags()  # --model --dtype --device --prompt_mode
  steering.define_sae_flags()  # --sae --layer
  flags.mark_flag_as_required("sae")
  flags.adopt_module_key_flags(llava)  # --help lists the shared flags too
  flags.adopt_module_key_flags(steering)
  _IMAGES = flags.DEFINE_string("images", None, "Held-out inputs: a folder of images, a JSONL of "
                                "{image, prompt} or a saved datasets folder.", required=True)
  _IMAGE_COLUMN = flags.DEFINE_string("image_column", "image", "Image column of a datasets input.")
  _SPLIT = flags.DEFINE_string("split", "train", "Split of a datasets input.")
  _PROMPT = flags.DEFINE_string("prompt", "Write a short caption for this image.", "Prompt of "
                                "every input without its own (JSONL or dataset 'prompt').")
  _TOKENS = flags.DEFINE_enum("tokens", "all", list(tokens.TOKEN_MODES), "Tokens the SAE is "
                              "measured and spliced at (harvest's --tokens).")
  _MAX_IMAGES = flags.DEFINE_integer("max_images", 64, "Evaluate the first N inputs (0: all).",
                                     lower_bound=0)
  _BATCH_SIZE = flags.DEFINE_integer("batch_size", 4, "Inputs per forward pass.", lower_bound=1)
  _DENSE = flags.DEFINE_float("dense_threshold", 0.1, "A latent firing on more than this fraction "
                              "of tokens counts as dense.")
  _OUT = flags.DEFINE_string("out", None, "JSON file for the results (optional).")

  def main():
    loaded = _LLAVA.load()
    sae, layer = steering.load_sae(loaded, flags.FLAGS.sae, flags.FLAGS.layer)
    inputs = images_lib.open_inputs(_IMAGES.value, _IMAGE_COLUMN.value, _SPLIT.value)
    result = evaluate(loaded, sae, layer, inputs, prompt_mode=_LLAVA.prompt_mode.value,
                      prompt=_PROMPT.value, token_mode=_TOKENS.value,
                      batch_size=_BATCH_SIZE.value, max_images=_MAX_IMAGES.value,
                      dense_threshold=_DENSE.value)
    result = {"model": _LLAVA.model.value, "sae": flags.FLAGS.sae, "layer": layer, "token_mode": _TOKENS.value,
              **result}
    if _OUT.value:
      atomic_write_json(Path(_OUT.value), result)
    print(json.dumps({"ok": True, "out": _OUT.value, **result}))

  cli.run(main, (QualityError, steering.SteeringError, HookError, llava.ModelError,
                 images_lib.InputError, tokens.TokenError))
