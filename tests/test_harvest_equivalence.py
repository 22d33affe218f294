"""Harvested rows equal the model's own hidden states, and base-grid patches are where we say."""

import json

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from harvest import llava
from harvest.run import HarvestConfig, harvest
from sae_jax.store import KIND_IMAGE_BASE, KIND_IMAGE_OTHER, KIND_TEXT, Store

# Prompts of very different lengths, so a batch is padded.
PROMPTS = ["", "What is it?", "Describe the colours, the shapes and the textures of this picture "
           "in a long and careful sentence, please.", "Where?", "How many objects are there?", "A"]


def _unbatched_reference(model, processor, image, text, layers):
  """hidden_states[L + 1] of one unpadded input, the embeddings fed to the LLM, and the inputs."""
  encoded = llava.encode_batch(processor, [image], [text])
  seen = {}
  hook = model.model.language_model.register_forward_pre_hook(
      lambda module, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"][0]), with_kwargs=True)
  try:
    with torch.no_grad():
      out = model(**encoded, output_hidden_states=True)
  finally:
    hook.remove()
  return {layer: out.hidden_states[layer + 1][0] for layer in layers}, seen["embeds"], encoded


def _base_grid_features(model, pixel_values):
  """Projected vision features of the base crop alone, computed apart from the LLaVA forward."""
  config = model.config
  with torch.no_grad():
    hidden = model.model.vision_tower(pixel_values[None], output_hidden_states=True).hidden_states
    selected = hidden[config.vision_feature_layer]
    if config.vision_feature_select_strategy == "default":
      selected = selected[:, 1:]  # CLIP's CLS token
    return model.model.multi_modal_projector(selected)[0]


@pytest.mark.parametrize("kind", ["llava", "llava_next", "llava_onevision"])
def test_batched_rows_equal_unbatched_hidden_states(kind, tiny_model, synthetic_images, tmp_path):
  model_dir = tiny_model(kind)
  sources = sorted(synthetic_images.glob("*.png"))[:6]
  jsonl = tmp_path / "inputs.jsonl"
  jsonl.write_text("".join(json.dumps({"image": str(p), "prompt": q}) + "\n"
                           for p, q in zip(sources, PROMPTS)))
  layers = (0, 1)
  config = HarvestConfig(model=str(model_dir), layers=layers, images=str(jsonl),
                         out=str(tmp_path / "store"), prompt_mode="chat", tokens="all",
                         store_dtype="float32", batch_size=3, shard_images=3)
  summary = harvest(config, progress=False)
  assert summary["images"] == 6 and summary["shards"] == 2

  model = transformers.AutoModelForImageTextToText.from_pretrained(model_dir).eval()
  processor = transformers.AutoProcessor.from_pretrained(model_dir)
  grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
  stores = {layer: Store(tmp_path / "store" / f"layer_{layer}", verify=True) for layer in layers}
  meta = stores[1].meta()
  table = stores[1].images()
  assert [r["id"] for r in table] == list(range(6))
  sizes = set()
  for record in table:
    image = Image.open(record["source"]).convert("RGB")
    sizes.add(image.size)
    expected, embeds, encoded = _unbatched_reference(model, processor, image, record["prompt"],
                                                     layers)
    mine = np.flatnonzero(meta["image_id"] == record["id"])
    rows = meta[mine]
    # Every token but BOS, in order; text and image tokens where the input ids say.
    ids = encoded["input_ids"][0].numpy()
    np.testing.assert_array_equal(rows["position"], np.arange(1, len(ids)))
    is_image = ids[rows["position"]] == model.config.image_token_id
    assert np.all((rows["kind"] == KIND_TEXT) == ~is_image)
    # The record's text tokens are the text rows' positions and ids (what interpret decodes).
    text = rows["position"][rows["kind"] == KIND_TEXT]
    assert record["text_tokens"] == [[int(p), int(ids[p])] for p in text]
    positions = rows["position"].astype(np.int64)
    base = rows[rows["kind"] == KIND_IMAGE_BASE]
    np.testing.assert_array_equal(base["patch"], np.arange(grid * grid))
    assert np.all(rows["patch"][rows["kind"] != KIND_IMAGE_BASE] == -1)
    assert record["grid"] == [grid, grid]
    # LLaVA-1.5's CLIP processor crops the centre; NeXT and OneVision squash the whole image.
    assert record["view"] == ("center_crop" if kind == "llava" else "squash")
    if kind == "llava":
      assert not np.any(rows["kind"] == KIND_IMAGE_OTHER)
    else:
      assert np.sum(rows["kind"] == KIND_IMAGE_OTHER) > 0  # anyres tiles and newlines
    for layer in layers:
      acts = torch.from_numpy(np.concatenate([a for _, a, _ in stores[layer].iter_shards()])[mine])
      if layer == model.config.text_config.num_hidden_layers - 1:
        # transformers replaces the last hidden state by its final-norm output; the block's own
        # output (what the paper hooks, and we store) is the value before that norm.
        with torch.no_grad():
          acts = model.model.language_model.norm(acts)
      torch.testing.assert_close(acts, expected[layer][positions], rtol=1e-4, atol=1e-4)
    # The LLM input at the base rows is the base crop's own projected features, patch by patch.
    base_crop = encoded["pixel_values"][0] if kind == "llava" else encoded["pixel_values"][0, 0]
    torch.testing.assert_close(embeds[base["position"].astype(np.int64)],
                               _base_grid_features(model, base_crop))
  assert len(sizes) > 1  # images of several sizes and aspect ratios
