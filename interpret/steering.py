"""Steering: edit the residual stream at a hookpoint with an exported SAE, inside any forward pass.

With a = the activations of the dictionary at x (TopK: a_f = 0 when latent f is not among the k
winners; JumpReLU: when its pre-activation is at most its threshold), d_f = W_dec[f], the modes are
  clamp       x + sum_f (c_f - a_f(x)) d_f     latent f set to c_f, the SAE error kept: for a linear
              decoder this is decode(a with a_f := c_f) + (x - decode(a))
  ablate      clamp with every c_f = 0
  add         x + sum_f alpha_f d_f            Neuronpedia's SIMPLE_ADDITIVE (no encoding needed)
  add_scaled  x + |x| sum_f gamma_f d_f/|d_f|  the strength relative to each token's norm (SSL,
              Hua et al. 2025, uses gamma = 0.2 with this paper's SAE)
  replace     x := decode(TopK(pre with pre_f := c_f)), the error dropped: the paper's steering hook
              (multimodal-sae `features/steering.py`), kept for reproduction. As there, every real
              position is replaced by its reconstruction and the clamps act only at `positions`, so
              an empty edit list is the reconstruction-only control.

Positions: image (the image placeholder tokens), text (prompt tokens that are neither image, BOS
nor padding), prompt (every real prompt token, BOS included, as the paper clamps), generated (the
tokens produced by `generate`), all (prompt + generated). Padding is never edited.

How a call knows where it is: a pre-hook on the whole model records the prompt batch (input_ids,
attention mask) whenever a forward pass starts with an empty KV cache, and a pre-hook on the
decoder block reads how many tokens the cache already holds, which is the absolute position of the
call's first token. So a plain forward pass, the prefill of `generate` and its one-token decode
steps are all handled, with left or right padding, without the caller telling the hook anything.
The cache is found by its type, not its keyword (transformers 4.x passes `past_key_values`, 5.x
`cache`), with `cache_position` as the fallback.

The SAE runs in float32 whatever the model's dtype, and the result is cast back. Rows that are not
edited are never touched, and leaving the context removes every hook, so the model is restored
bit for bit.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch
from absl import flags
from torch import nn
from transformers.cache_utils import Cache

from harvest import llava
from harvest.hooks import HookError, find_decoder_layers
from interpret.sae import SAE
from sae_jax.formats import dictionary

MODES = ("clamp", "add", "add_scaled", "ablate", "replace")
POSITIONS = ("image", "text", "prompt", "generated", "all")
# Rows encoded at once: bounds the dense [rows, num_latents] pre-activations (131k latents x 1024
# rows x 4 bytes = 512 MiB).
CHUNK_ROWS = 1024


class SteeringError(ValueError):
  """A steering request that cannot be applied (bad latent, mode, positions or hookpoint)."""


@dataclasses.dataclass(frozen=True)
class Edit:
  """One latent's edit: the clamp value c (clamp, replace) or the multiple (add, add_scaled)."""
  latent: int
  value: float = 0.0


def layer_of_hookpoint(hookpoint: str) -> int:
  """Decoder layer index of a hookpoint name: 'model.layers.24' or '...language_model.layers.24'."""
  layer = dictionary.layer_index(hookpoint)
  if layer is None:
    raise SteeringError(f"cannot tell the decoder layer from the SAE's hookpoint {hookpoint!r}; "
                        "pass --layer")
  return layer


def define_sae_flags() -> None:
  """--sae and --layer, for every command that applies an exported SAE inside the model."""
  flags.DEFINE_string("sae", None, "Exported dictionary: EXPORT/<hookpoint> (or an EXPORT with one "
                      "hookpoint), sparsify or SAELens layout.")
  flags.DEFINE_integer("layer", -1, "Decoder layer the SAE reads (-1: the layer of the export's "
                       "hookpoint).")


def define_flags() -> None:
  """The steering flags shared by `interpret.steer` and `eval.hallucination`."""
  define_sae_flags()
  flags.DEFINE_list("latents", [], "Latent indices to edit, e.g. 12,40.")
  flags.DEFINE_enum("mode", "clamp", MODES, "clamp: set to a value, SAE error kept; add: add "
                    "value x decoder row; add_scaled: add value x |x| x unit decoder row; "
                    "ablate: clamp to 0; replace: the paper's reconstruction replacement (error "
                    "dropped).")
  flags.DEFINE_list("values", [], "One value per latent, applied together in one run.")
  flags.DEFINE_list("strengths", [], "A sweep: one run per strength, every latent at it.")
  flags.DEFINE_enum("positions", "all", POSITIONS, "Which tokens are edited: image, text, prompt "
                    "(all prompt tokens), generated, or all.")


def _numbers(flag_values, name: str, kind: type) -> list:
  try:
    return [kind(v) for v in flag_values[name].value]
  except ValueError as e:
    raise SteeringError(f"--{name}={','.join(flag_values[name].value)}: expected "
                        f"{kind.__name__} values") from e


def configs_from_flags(flag_values) -> list[tuple[str, list[Edit]]]:
  """edit_configs of the flags of `define_flags`."""
  return configs_for_latents(flag_values, _numbers(flag_values, "latents", int))


def configs_for_latents(flag_values, latents: Sequence[int]) -> list[tuple[str, list[Edit]]]:
  """edit_configs of `latents` with the mode, values and strengths of the flags."""
  return edit_configs(latents, flag_values["mode"].value, _numbers(flag_values, "values", float),
                      _numbers(flag_values, "strengths", float))


def edit_configs(latents: Sequence[int], mode: str, values: Sequence[float] | None,
                 strengths: Sequence[float] | None) -> list[tuple[str, list[Edit]]]:
  """(label, edits) of each steering run of a command line.

  values: one run with latent i at values[i]. strengths: one run per strength s with every latent
  at s (a sweep). ablate needs neither; replace with no latents is the reconstruction-only control.
  """
  if mode == "ablate":
    if values or strengths:
      raise SteeringError("--mode=ablate takes no --values or --strengths (it clamps to 0)")
    return [(",".join(f"{f}=0" for f in latents), [Edit(f, 0.0) for f in latents])]
  if values and strengths:
    raise SteeringError("give either --values (one per latent) or --strengths (a sweep), not both")
  if values:
    if len(values) != len(latents):
      raise SteeringError(f"--values has {len(values)} numbers for {len(latents)} --latents")
    label = ",".join(f"{f}={v:g}" for f, v in zip(latents, values))
    return [(label, [Edit(f, v) for f, v in zip(latents, values)])]
  if strengths:
    return [(f"{s:g}", [Edit(f, s) for f in latents]) for s in strengths]
  if mode == "replace" and not latents:
    return [("reconstruction", [])]
  raise SteeringError(f"--mode={mode} needs --values or --strengths")


def cached_tokens(kwargs: dict, layer: int = 0) -> int:
  """Tokens already in the KV cache of a forward call (its first token's absolute position)."""
  for value in kwargs.values():
    if isinstance(value, Cache):
      return int(value.get_seq_length(layer))
  position = kwargs.get("cache_position")
  if position is not None and position.numel():
    return int(position.reshape(-1)[0])
  return 0


class BlockEdit:
  """Context manager: `edit(hidden [B, L, d], offset)` may replace decoder block `layer`'s output.

  `offset` is the absolute position of the call's first token (the KV-cache length before the
  block ran; 0 without a cache). Returning None leaves the output untouched. The block's output
  may be a tensor (transformers >= 5) or a tuple whose first element is the hidden states.
  """

  def __init__(self, model: nn.Module, layer: int,
               edit: Callable[[torch.Tensor, int], torch.Tensor | None]):
    path, blocks = find_decoder_layers(model)
    if not 0 <= layer < len(blocks):
      raise HookError(f"layer {layer} does not exist; {path} has {len(blocks)} decoder layers")
    self.block, self.layer, self._edit = blocks[layer], layer, edit
    self._handles: list = []
    self._offset = 0

  def __enter__(self) -> "BlockEdit":
    self._handles = [
        self.block.register_forward_pre_hook(self._before, with_kwargs=True),
        self.block.register_forward_hook(self._after)]
    return self

  def __exit__(self, *exc) -> None:
    for handle in self._handles:
      handle.remove()
    self._handles = []

  def _before(self, module, args, kwargs):
    del module, args
    self._offset = cached_tokens(kwargs, self.layer)

  def _after(self, module, args, output):
    del module, args
    hidden = output[0] if isinstance(output, tuple) else output
    edited = self._edit(hidden, self._offset)
    if edited is None:
      return None
    return (edited, *output[1:]) if isinstance(output, tuple) else edited


class Steering:
  """Edits latents of `sae` at decoder block `layer` of a LLaVA model while the context is open.

      with Steering(model, sae, layer, [Edit(12, 40.0)], mode="clamp", positions="image",
                    image_token_id=..., bos_token_id=...):
        model.generate(**inputs)
  """

  def __init__(self, model: nn.Module, sae: SAE, layer: int, edits: Sequence[Edit], *,
               mode: str, positions: str, image_token_id: int, bos_token_id: int | None):
    if mode not in MODES:
      raise SteeringError(f"--mode={mode}: expected one of {MODES}")
    if positions not in POSITIONS:
      raise SteeringError(f"--positions={positions}: expected one of {POSITIONS}")
    for edit in edits:
      if not 0 <= edit.latent < sae.num_latents:
        raise SteeringError(f"--latents: latent {edit.latent} does not exist; the SAE has "
                            f"{sae.num_latents} latents")
    if not edits and mode != "replace":
      raise SteeringError(f"--mode={mode} needs at least one latent")
    self.model, self.sae, self.mode, self.positions = model, sae, mode, positions
    self.image_token_id, self.bos_token_id = image_token_id, bos_token_id
    device = sae.W_dec.device
    self._latents = torch.tensor([e.latent for e in edits], dtype=torch.long, device=device)
    self._values = torch.tensor([0.0 if mode == "ablate" else e.value for e in edits],
                                dtype=torch.float32, device=device)
    self._block = BlockEdit(model, layer, self._edit)
    self._handle = None
    self._prompt: dict[str, torch.Tensor] | None = None
    self.edited_positions = 0  # positions steered since the context opened (for reports)

  def __enter__(self) -> "Steering":
    self._handle = self.model.register_forward_pre_hook(self._record_prompt, with_kwargs=True)
    self._block.__enter__()
    return self

  def __exit__(self, *exc) -> None:
    self._block.__exit__(*exc)
    if self._handle is not None:
      self._handle.remove()
      self._handle = None
    self._prompt = None

  def _record_prompt(self, module, args, kwargs):
    del module
    if cached_tokens(kwargs) > 0:
      return  # a decode step of the prompt recorded at the prefill
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    if input_ids is None:
      raise SteeringError("steering needs input_ids (not inputs_embeds) to find the positions")
    mask = kwargs.get("attention_mask")
    real = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
    image = real & (input_ids == self.image_token_id)
    not_bos = input_ids != self.bos_token_id if self.bos_token_id is not None else True
    self._prompt = {"real": real, "image": image, "text": real & ~image & not_bos,
                    "prompt": real, "generated": torch.zeros_like(real), "all": real}

  def _masks(self, batch: int, length: int, offset: int,
             device) -> tuple[torch.Tensor, torch.Tensor]:
    """(selected, real) [batch, length] for the call covering positions offset..offset+length-1."""
    if self._prompt is None:
      raise SteeringError("the decoder block ran before the model's forward pass recorded a prompt")
    prompt_len = self._prompt["real"].shape[1]
    if self._prompt["real"].shape[0] != batch:
      raise SteeringError(f"the block sees a batch of {batch}, the prompt had "
                          f"{self._prompt['real'].shape[0]} rows")
    before = max(0, min(length, prompt_len - offset))  # how many of the call's tokens are prompt
    in_prompt = slice(offset, offset + before)
    selected = [self._prompt[self.positions][:, in_prompt]]
    real = [self._prompt["real"][:, in_prompt]]
    if before < length:  # generated tokens are always real
      generated = torch.ones(batch, length - before, dtype=torch.bool, device=device)
      selected.append(generated if self.positions in ("generated", "all") else ~generated)
      real.append(generated)
    return torch.cat(selected, 1).to(device), torch.cat(real, 1).to(device)

  def _edit(self, hidden: torch.Tensor, offset: int) -> torch.Tensor | None:
    selected, real = self._masks(hidden.shape[0], hidden.shape[1], offset, hidden.device)
    rows_at = real if self.mode == "replace" else selected
    if not rows_at.any():
      return None
    self.edited_positions += int(selected.sum())
    rows = hidden[rows_at].to(self.sae.W_dec.dtype)
    if self.mode == "add":
      new = rows + self._values @ self.sae.W_dec[self._latents]
    elif self.mode == "add_scaled":
      units = nn.functional.normalize(self.sae.W_dec[self._latents], dim=-1)
      new = rows + rows.norm(dim=-1, keepdim=True) * (self._values @ units)
    elif self.mode == "replace":
      new = torch.cat([self._reconstruct(r, s) for r, s in
                       zip(rows.split(CHUNK_ROWS), selected[real].split(CHUNK_ROWS))])
    else:
      new = torch.cat([self._clamp(r) for r in rows.split(CHUNK_ROWS)])
    out = hidden.clone()
    out[rows_at] = new.to(hidden.dtype)
    return out

  def _clamp(self, rows: torch.Tensor) -> torch.Tensor:
    """rows + sum_f (c_f - a_f) d_f, with a_f the SAE's activation (0 where inactive)."""
    values, indices = self.sae.encode(rows)
    hits = indices.unsqueeze(-1) == self._latents  # [rows, k, edits]
    current = (values.unsqueeze(-1) * hits).sum(1)  # [rows, edits]
    return rows + (self._values - current) @ self.sae.W_dec[self._latents]

  def _reconstruct(self, rows: torch.Tensor, clamp_here: torch.Tensor) -> torch.Tensor:
    """The paper's hook: pre-activations clamped (where asked), TopK (or JumpReLU), decode; no
    error term."""
    pre = self.sae.pre_activations(rows)
    if len(self._latents):
      pre[:, self._latents] = torch.where(clamp_here[:, None], self._values, pre[:, self._latents])
    return self.sae.decode(*self.sae.activate(pre))


def load_sae(loaded: llava.LoadedModel, path: str, layer: int) -> tuple[SAE, int]:
  """The SAE at `path` in float32 on the model's device, and its decoder layer: the layer of the
  hookpoint its metadata records (dictionary.read); `layer` >= 0 must agree with it."""
  try:
    sae = SAE.from_export(path, dtype=torch.float32, device=loaded.device)
  except (dictionary.DictionaryError, OSError) as e:
    raise SteeringError(f"--sae={path}: {e}") from e
  if sae.d_in != loaded.d_model:
    raise SteeringError(f"--sae={path} reads vectors of width {sae.d_in} but the model's "
                        f"residual stream has width {loaded.d_model}")
  hookpoint = sae.info["hookpoint"]
  if layer < 0:
    return sae, layer_of_hookpoint(hookpoint)
  trained_at = dictionary.layer_index(hookpoint)
  if trained_at is not None and trained_at != layer:
    raise SteeringError(f"--layer={layer}, but the SAE at {path} was trained on {hookpoint} "
                        f"(layer {trained_at}); leave --layer out")
  return sae, layer


def steering_for(loaded: llava.LoadedModel, sae: SAE, layer: int, edits: Sequence[Edit],
                 mode: str, positions: str) -> Steering:
  return Steering(loaded.model, sae, layer, edits, mode=mode, positions=positions,
                  image_token_id=loaded.layout.image_token_id,
                  bos_token_id=loaded.layout.bos_token_id)


@torch.no_grad()
def generate_ids(loaded: llava.LoadedModel, images: list | None, texts: list[str],
                 max_new_tokens: int) -> tuple[dict, torch.Tensor]:
  """(model inputs, prompt + greedy continuation ids) of a batch of prompts, left-padded, so every
  row ends at the same position and decoding appends to all rows at once."""
  encoded = llava.encode_batch(loaded.processor, images, texts, padding_side="left")
  inputs = llava.to_model_inputs(loaded, encoded)
  pad = loaded.processor.tokenizer.pad_token_id
  return inputs, loaded.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=pad)


def generate_texts(loaded: llava.LoadedModel, images: list | None, texts: list[str],
                   max_new_tokens: int) -> list[str]:
  """Greedy continuations of a batch of prompts, decoded without special tokens."""
  inputs, out = generate_ids(loaded, images, texts, max_new_tokens)
  return loaded.processor.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:],
                                                 skip_special_tokens=True)
