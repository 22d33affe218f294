"""Tiny checkpoints load like real ones, are deterministic; synthetic images and prompts."""

import numpy as np
import pytest
import torch
import transformers

from harvest import images, llava, tiny


@pytest.mark.parametrize("kind, model_cls", [
    ("llava", transformers.LlavaForConditionalGeneration),
    ("llava_next", transformers.LlavaNextForConditionalGeneration),
    ("llava_onevision", transformers.LlavaOnevisionForConditionalGeneration)])
def test_tiny_model_loads_through_the_auto_classes(kind, model_cls, tiny_model):
  model = transformers.AutoModelForImageTextToText.from_pretrained(tiny_model(kind))
  processor = transformers.AutoProcessor.from_pretrained(tiny_model(kind))
  assert type(model) is model_cls
  assert model.config.text_config.num_hidden_layers == tiny.NUM_LAYERS
  assert processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id
  text = llava.prompt_text(processor, "chat", "What is this?")
  assert text.startswith("USER: <image>") and text.endswith("ASSISTANT:")
  encoded = llava.encode_batch(processor, [images.synthetic_image(0)], [text])
  with torch.no_grad():
    logits = model(**encoded).logits
  assert logits.shape[:2] == encoded["input_ids"].shape and torch.isfinite(logits).all()


def test_tiny_weights_are_seeded():
  first, _ = tiny.build("llava", seed=3)
  second, _ = tiny.build("llava", seed=3)
  other, _ = tiny.build("llava", seed=4)
  for (name, a), b, c in zip(first.state_dict().items(), second.state_dict().values(),
                             other.state_dict().values()):
    assert torch.equal(a, b), name
  assert not all(torch.equal(a, c) for a, c in zip(first.parameters(), other.parameters()))


def test_bare_prompt_is_the_literal_image_token(tiny_model):
  processor = transformers.AutoProcessor.from_pretrained(tiny_model("llava"))
  assert llava.prompt_text(processor, "bare", "") == "<image>"
  assert llava.prompt_text(processor, "bare", "Describe.") == "<image>\nDescribe."


def test_synthetic_images_are_varied_and_deterministic(tmp_path):
  paths = images.write_synthetic_images(tmp_path, 12, seed=5)
  again = [np.asarray(images.synthetic_image(5 + i)) for i in range(12)]
  loaded = [np.asarray(images.open_inputs(str(tmp_path)).load(i)) for i in range(12)]
  assert [p.name for p in paths] == sorted(p.name for p in tmp_path.glob("*.png"))
  assert all(np.array_equal(a, b) for a, b in zip(again, loaded))
  assert len({a.shape for a in loaded}) > 6  # many sizes and aspect ratios
  assert len({a.mean().round(1) for a in loaded}) == 12
