"""Tiny but real LLaVA checkpoints, built locally (no download), for tests and the quickstart.

`python -m harvest.tiny --kind=llava|llava_next|llava_onevision --out=DIR` writes a folder that
`AutoProcessor.from_pretrained` and `AutoModelForImageTextToText.from_pretrained` load exactly like
a hub checkpoint: config + safetensors weights, a byte-level BPE tokenizer trained on a few lines of
text (so any prompt tokenizes), the class's own image processor at a small size, and the processor
with a chat template. Weights come from a fixed seed, so the same command writes the same model.

Sizes: hidden 64, 2 decoder layers, a 2-layer vision tower on 56 px images with 14 px patches, so
the base image grid is 4x4 = 16 tokens (the real models' 24x24 = 576).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

KINDS = ("llava", "llava_next", "llava_onevision")
IMAGE_SIZE = 56
PATCH_SIZE = 14
HIDDEN = 64
NUM_LAYERS = 2
# Anyres resolutions, multiples of the tile size as in the real checkpoints (336 -> 672, 1008).
GRID_PINPOINTS = [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<video>"]
# LLaVA-1.5's template, reduced to what the processor needs: the image goes before the text.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] != 'user' %}</s>{% endif %}\n"
    "{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}")
_CORPUS = [
    "USER: Describe the image. ASSISTANT: A red circle on a blue background.",
    "What is in this picture? There is a striped square, a green triangle and some noise.",
    "The quick brown fox jumps over the lazy dog. Colours, shapes, textures and lines.",
    "How many objects are there? Where is the cat? Is the sky cloudy today?",
]


def build_tokenizer() -> transformers.PreTrainedTokenizerFast:
  """A byte-level BPE tokenizer (every string encodes) that prepends BOS like Llama's."""
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(_CORPUS, trainers.BpeTrainer(
      vocab_size=400, special_tokens=SPECIAL_TOKENS, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  bos = tok.token_to_id("<s>")
  tok.post_processor = processors.TemplateProcessing(
      single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
      pad_token="<pad>", extra_special_tokens={"image_token": "<image>"},
      model_max_length=4096)


@dataclasses.dataclass(frozen=True)
class Sizes:
  """The shapes of a tiny model (harvest.world trains larger grids than the fast tests use)."""
  image_size: int = IMAGE_SIZE
  patch_size: int = PATCH_SIZE
  hidden: int = HIDDEN
  num_layers: int = NUM_LAYERS
  vision_hidden: int = 32
  vision_layers: int = 2
  grid_pinpoints: tuple = tuple(tuple(p) for p in GRID_PINPOINTS)

  @property
  def grid_tokens(self) -> int:
    return (self.image_size // self.patch_size) ** 2


TINY = Sizes()


def _text_config(kind: str, vocab_size: int, tokenizer, sizes: Sizes):
  common = dict(
      vocab_size=vocab_size, hidden_size=sizes.hidden, intermediate_size=2 * sizes.hidden,
      num_hidden_layers=sizes.num_layers, num_attention_heads=4, num_key_value_heads=2,
      max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
  # OneVision's real checkpoints pair SigLIP with Qwen2; the others use CLIP with Llama.
  if kind == "llava_onevision":
    return transformers.Qwen2Config(**common)
  return transformers.LlamaConfig(**common)


def _vision_config(kind: str, sizes: Sizes) -> transformers.PreTrainedConfig:
  common = dict(hidden_size=sizes.vision_hidden, intermediate_size=2 * sizes.vision_hidden,
                num_hidden_layers=sizes.vision_layers, num_attention_heads=2,
                image_size=sizes.image_size, patch_size=sizes.patch_size)
  if kind == "llava_onevision":
    return transformers.SiglipVisionConfig(**common)
  return transformers.CLIPVisionConfig(projection_dim=32, **common)


def _image_processor(kind: str, sizes: Sizes):
  side, pinpoints = sizes.image_size, [list(p) for p in sizes.grid_pinpoints]
  clip_norm = dict(image_mean=[0.48145466, 0.4578275, 0.40821073],
                   image_std=[0.26862954, 0.26130258, 0.27577711])
  if kind == "llava":
    return transformers.CLIPImageProcessor(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}, **clip_norm)
  if kind == "llava_next":
    return transformers.LlavaNextImageProcessor(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side},
        image_grid_pinpoints=pinpoints, **clip_norm)
  return transformers.LlavaOnevisionImageProcessor(
      size={"height": side, "width": side}, image_grid_pinpoints=pinpoints,
      image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def build(kind: str, seed: int = 0, sizes: Sizes = TINY, tokenizer=None):
  """Returns (model, processor) of the given kind with weights drawn from `seed`.

  `tokenizer`: default the byte-level BPE of `build_tokenizer`; it needs the SPECIAL_TOKENS."""
  if kind not in KINDS:
    raise ValueError(f"unknown tiny model kind {kind!r}; expected one of {KINDS}")
  tokenizer = tokenizer or build_tokenizer()
  image_token_id = tokenizer.convert_tokens_to_ids("<image>")
  vision, text = _vision_config(kind, sizes), _text_config(kind, len(tokenizer), tokenizer, sizes)
  image_processor = _image_processor(kind, sizes)
  pinpoints, grid_tokens = [list(p) for p in sizes.grid_pinpoints], sizes.grid_tokens
  if kind == "llava":
    config = transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=image_token_id,
        image_seq_length=grid_tokens)
    model_cls, processor = transformers.LlavaForConditionalGeneration, transformers.LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=sizes.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE)
  elif kind == "llava_next":
    config = transformers.LlavaNextConfig(
        vision_config=vision, text_config=text, image_token_id=image_token_id,
        image_grid_pinpoints=pinpoints, image_seq_length=grid_tokens)
    model_cls, processor = (
        transformers.LlavaNextForConditionalGeneration, transformers.LlavaNextProcessor(
            image_processor=image_processor, tokenizer=tokenizer, patch_size=sizes.patch_size,
            vision_feature_select_strategy="default", num_additional_image_tokens=1,
            chat_template=CHAT_TEMPLATE))
  else:
    config = transformers.LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_id=image_token_id,
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints, vision_feature_select_strategy="full",
        vision_feature_layer=-1)
    video_processor = transformers.LlavaOnevisionVideoProcessor(
        size={"height": sizes.image_size, "width": sizes.image_size})
    model_cls, processor = (
        transformers.LlavaOnevisionForConditionalGeneration, transformers.LlavaOnevisionProcessor(
            image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
            num_image_tokens=grid_tokens,
            vision_feature_select_strategy="full", chat_template=CHAT_TEMPLATE))
  torch.manual_seed(seed)
  model = model_cls(config).eval()
  return model, processor


def save(kind: str, out: str | Path, seed: int = 0) -> Path:
  """Builds and saves a tiny model; an existing folder with the same kind and seed is kept."""
  out = Path(out)
  stamp = out / "tiny_model.json"
  wanted = {"kind": kind, "seed": seed}
  if stamp.exists() and json.loads(stamp.read_text()) == wanted:
    return out
  model, processor = build(kind, seed)
  model.save_pretrained(out)
  processor.save_pretrained(out)
  stamp.write_text(json.dumps(wanted) + "\n")  # written last: marks a complete folder
  return out


if __name__ == "__main__":
  from absl import flags

  from sae_jax import cli

  _KIND = flags.DEFINE_enum("kind", "llava_next", KINDS, "Which LLaVA class to build.")
  _OUT = flags.DEFINE_string("out", None, "Folder to save the model and processor in.",
                             required=True)
  _SEED = flags.DEFINE_integer("seed", 0, "Seed of the random weights.")

  def main():
    out = save(_KIND.value, _OUT.value, _SEED.value)
    print(json.dumps({"ok": True, "kind": _KIND.value, "out": str(out)}))

  cli.run(main)
