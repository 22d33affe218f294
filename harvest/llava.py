"""Loading a LLaVA-like checkpoint and turning images + prompts into its input tensors."""

from __future__ import annotations

import dataclasses

import torch
import transformers
from absl import flags

from harvest.tokens import ImageLayout

# model_type in config.json -> class; the three LLaVA generations harvest knows the layout of.
LLAVA_CLASSES = {
    "llava": transformers.LlavaForConditionalGeneration,
    "llava_next": transformers.LlavaNextForConditionalGeneration,
    "llava_onevision": transformers.LlavaOnevisionForConditionalGeneration,
}
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(ValueError):
  """A `--model` that cannot be loaded or is not LLaVA-like."""


@dataclasses.dataclass
class LoadedModel:
  model: torch.nn.Module
  processor: object
  model_type: str
  layout: ImageLayout
  d_model: int
  device: torch.device


def resolve_device(device: str) -> torch.device:
  if device == "auto":
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
  if device == "cuda" and not torch.cuda.is_available():
    raise ModelError("--device=cuda but torch sees no CUDA device")
  return torch.device(device)


def load_llava(name: str, dtype: str, device: str) -> LoadedModel:
  """Model (eval mode, on `device`) and processor of a LLaVA checkpoint, folder or hub id."""
  try:
    config = transformers.AutoConfig.from_pretrained(name)
  except (OSError, ValueError) as e:
    raise ModelError(f"--model={name}: cannot load its config: {e}") from e
  if config.model_type not in LLAVA_CLASSES:
    raise ModelError(
        f"--model={name} is a {config.model_type!r} model ({getattr(config, 'architectures', None)}),"
        f" not LLaVA-like; harvest supports model types {sorted(LLAVA_CLASSES)}")
  target = resolve_device(device)
  model = LLAVA_CLASSES[config.model_type].from_pretrained(name, dtype=TORCH_DTYPES[dtype])
  model.to(target).eval()
  processor = transformers.AutoProcessor.from_pretrained(name)
  # Right padding keeps every real token at its unbatched position (the LLM numbers positions
  # 0..T-1 whatever the mask says), so batched rows equal unbatched ones.
  processor.tokenizer.padding_side = "right"
  vision = config.vision_config
  grid = vision.image_size // vision.patch_size
  layout = ImageLayout(
      image_token_id=config.image_token_id, bos_token_id=processor.tokenizer.bos_token_id,
      grid=(grid, grid), base_first=config.model_type != "llava")
  return LoadedModel(model=model, processor=processor, model_type=config.model_type,
                     layout=layout, d_model=config.text_config.hidden_size, device=target)


@dataclasses.dataclass(frozen=True)
class ModelFlags:
  """--model, --dtype, --device and --prompt_mode of a command that runs a LLaVA model."""
  model: flags.FlagHolder
  dtype: flags.FlagHolder
  device: flags.FlagHolder
  prompt_mode: flags.FlagHolder

  def load(self) -> LoadedModel:
    return load_llava(self.model.value, self.dtype.value, self.device.value)


def define_flags(*, dtype: str = "bfloat16", prompt_mode: str = "chat",
                 model_required: bool = True) -> ModelFlags:
  """The LLaVA model flags, one definition for every command (each adopts them for its --help).
  `model_required=False` for a command that can also run without a model (it checks itself)."""
  return ModelFlags(
      model=flags.DEFINE_string(
          "model", None, "LLaVA checkpoint: a local folder or a hub id (LLaVA-1.5, LLaVA-NeXT or "
          "LLaVA-OneVision classes of transformers).", required=model_required),
      dtype=flags.DEFINE_enum("dtype", dtype, list(TORCH_DTYPES),
                              "dtype the model runs in (an SAE always runs in float32)."),
      device=flags.DEFINE_enum("device", "auto", ["auto", "cpu", "cuda"],
                               "Where the model runs; auto picks cuda if present."),
      prompt_mode=flags.DEFINE_enum(
          "prompt_mode", prompt_mode, ["chat", "bare"],
          "chat: the model's chat template around the image and the prompt; bare: the paper's "
          "literal '<image>' (followed by a newline and the prompt if there is one)."))


def prompt_text(processor, mode: str, prompt: str, with_image: bool = True) -> str:
  """The text given to the processor for one image (or for none, with `with_image=False`).

  bare: the paper's literal image token (plus a newline and the prompt when one is given).
  chat: the checkpoint's chat template around one image and the prompt, ready for generation.
  """
  if mode == "bare":
    if not with_image:
      return prompt
    return processor.image_token + (f"\n{prompt}" if prompt else "")
  if not getattr(processor, "chat_template", None):
    raise ModelError("--prompt_mode=chat but the model's processor has no chat template")
  content = ([{"type": "image"}] if with_image else []) + (
      [{"type": "text", "text": prompt}] if prompt else [])
  return processor.apply_chat_template([{"role": "user", "content": content}],
                                       add_generation_prompt=True, tokenize=False)


def encode_batch(processor, images: list | None, texts: list[str],
                 padding_side: str = "right") -> dict:
  """Processor outputs for a batch as tensors (right-padded; generation needs "left"), without
  token_type_ids, which some tokenizers return (transformers 4.x) and no LLaVA forward takes."""
  bos = processor.tokenizer.bos_token
  # Templates that write BOS themselves (Llama-3's) must not get a second one from the tokenizer.
  add_special_tokens = not (bos and texts[0].startswith(bos))
  encoded = processor(images=images, text=texts, return_tensors="pt", padding=True,
                      padding_side=padding_side, add_special_tokens=add_special_tokens)
  return {k: v for k, v in encoded.items() if k != "token_type_ids"}


def to_model_inputs(loaded: LoadedModel, encoded: dict) -> dict:
  """Processor outputs on the model's device, with pixels in the model's dtype."""
  inputs = {k: v.to(loaded.device) for k, v in encoded.items()}
  if "pixel_values" in inputs:
    inputs["pixel_values"] = inputs["pixel_values"].to(loaded.model.dtype)
  return inputs
