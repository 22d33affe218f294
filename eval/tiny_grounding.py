"""Tiny but real GroundingDINO and SAM checkpoints, built locally (no download), for tests.

`python -m eval.tiny_grounding --out=DIR` writes DIR/grounding_dino and DIR/sam: config, weights
and processor, saved with save_pretrained, so `eval.grounded_iou --grounding_dino=DIR/grounding_dino
--sam=DIR/sam` loads them with from_pretrained exactly like the real ones. Weights come from a fixed
seed; they are random, so their boxes and masks mean nothing beyond exercising the pipeline.

Sizes are the smallest the classes accept: GroundingDINO's group norms need d_model >= 32 and a
feature map of more than one pixel at stride 64 (images are resized to 128 px), its box heads at
least two decoder layers.
"""

from __future__ import annotations

import json
from pathlib import Path

# A WordPiece vocabulary: BERT's special tokens, the letters (so any lower-case word tokenizes),
# and a few whole words.
VOCAB = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ","]
         + [chr(c) for c in range(ord("a"), ord("z") + 1)]
         + ["red", "blue", "green", "circle", "square", "triangle", "line", "stripes"])
DINO_IMAGE_SIZE = 128
SAM_IMAGE_SIZE = 64


def _grounding_dino(folder: Path):
  import transformers
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
  tokenizer = transformers.BertTokenizer(str(folder / "vocab.txt"))
  size = {"shortest_edge": DINO_IMAGE_SIZE, "longest_edge": DINO_IMAGE_SIZE}
  processor = transformers.GroundingDinoProcessor(
      image_processor=transformers.GroundingDinoImageProcessor(size=size), tokenizer=tokenizer)
  backbone = transformers.SwinConfig(
      window_size=7, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
      image_size=DINO_IMAGE_SIZE, out_features=["stage2", "stage3", "stage4"])
  text = transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=32,
                                 max_position_embeddings=64)
  config = transformers.GroundingDinoConfig(
      d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2,
      decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=10,
      num_feature_levels=4, encoder_n_points=2, decoder_n_points=2, backbone_config=backbone,
      text_config=text, max_text_len=64, use_timm_backbone=False, use_pretrained_backbone=False)
  transformers.GroundingDinoForObjectDetection(config).save_pretrained(folder)
  processor.save_pretrained(folder)


def _sam(folder: Path):
  import transformers
  processor = transformers.SamProcessor(image_processor=transformers.SamImageProcessor(
      size={"longest_edge": SAM_IMAGE_SIZE},
      pad_size={"height": SAM_IMAGE_SIZE, "width": SAM_IMAGE_SIZE},
      mask_size={"longest_edge": SAM_IMAGE_SIZE // 4}))
  config = transformers.SamConfig(
      vision_config=transformers.SamVisionConfig(
          hidden_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=SAM_IMAGE_SIZE,
          patch_size=8, output_channels=16, global_attn_indexes=[0], mlp_dim=16, window_size=2,
          num_pos_feats=8),
      prompt_encoder_config=transformers.SamPromptEncoderConfig(
          hidden_size=16, image_size=SAM_IMAGE_SIZE, patch_size=8, mask_input_channels=4),
      mask_decoder_config=transformers.SamMaskDecoderConfig(
          hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_dim=16,
          iou_head_hidden_dim=16))
  transformers.SamModel(config).save_pretrained(folder)
  processor.save_pretrained(folder)


def save(out: str | Path, seed: int = 0) -> dict[str, str]:
  """Writes both models under `out`; returns the --grounding_dino and --sam values."""
  import torch
  out = Path(out)
  torch.manual_seed(seed)
  _grounding_dino(out / "grounding_dino")
  _sam(out / "sam")
  return {"grounding_dino": str(out / "grounding_dino"), "sam": str(out / "sam")}


if __name__ == "__main__":
  from absl import flags

  from sae_jax import cli

  _OUT = flags.DEFINE_string("out", None, "Folder to write the two models to.", required=True)
  _SEED = flags.DEFINE_integer("seed", 0, "Seed of the random weights.")

  def main():
    print(json.dumps(save(_OUT.value, _SEED.value)))

  cli.run(main)
