"""Where an explanation is in an image: GroundingDINO finds its boxes, SAM segments them.

The paper's second metric grounds each explanation in its latent's top images this way and compares
the mask with the latent's activation map (eval/grounded_iou.py). As in the paper's code, every box
over the thresholds counts: the mask is the union of their SAM masks. Both models load from local
folders with transformers' from_pretrained (`GroundingDinoForObjectDetection`, `SamModel`, and the
processors saved with them): e.g. IDEA-Research/grounding-dino-base and facebook/sam-vit-huge
downloaded beforehand, or eval.tiny_grounding's random ones.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


class GroundingError(ValueError):
  """A model folder that cannot be loaded."""


def _load(flag: str, path: str, model_class: str, model_type: str, device: str):
  import transformers
  try:
    found = transformers.AutoConfig.from_pretrained(path).model_type
    # from_pretrained would build the class from another model's config, with only a warning.
    if found != model_type:
      raise ValueError(f"its config.json is a {found!r} model, not {model_type!r}")
    processor = transformers.AutoProcessor.from_pretrained(path)
    model = getattr(transformers, model_class).from_pretrained(path)
  except (OSError, ValueError) as e:
    raise GroundingError(f"--{flag}={path}: cannot load a {model_class} and its processor "
                         f"({type(e).__name__}: {e})") from e
  return processor, model.to(device).eval()


def prompt(text: str) -> str:
  """GroundingDINO's text form: lower case, ending with a period."""
  return " ".join(text.lower().split()).rstrip(".") + "."


class Grounder:

  def __init__(self, grounding_dino: str, sam: str, device: str = "cpu",
               box_threshold: float = 0.3, text_threshold: float = 0.25):
    self.device = device
    self.box_threshold, self.text_threshold = box_threshold, text_threshold
    self._dino_processor, self._dino = _load(
        "grounding_dino", grounding_dino, "GroundingDinoForObjectDetection", "grounding-dino", device)
    self._sam_processor, self._sam = _load("sam", sam, "SamModel", "sam", device)

  def boxes(self, image: Image.Image, text: str) -> list[list[float]]:
    """[x0, y0, x1, y1] in pixels of every box over the thresholds, best first."""
    import torch
    inputs = self._dino_processor(images=image, text=prompt(text), return_tensors="pt",
                                  truncation=True, max_length=self._dino.config.max_text_len)
    with torch.no_grad():
      outputs = self._dino(**inputs.to(self.device))
    found = self._dino_processor.post_process_grounded_object_detection(
        outputs, inputs["input_ids"], threshold=self.box_threshold,
        text_threshold=self.text_threshold, target_sizes=[(image.height, image.width)])[0]
    order = found["scores"].argsort(descending=True)
    return found["boxes"][order].tolist()

  def mask(self, image: Image.Image, boxes: list[list[float]], multimask: bool = False) -> np.ndarray:
    """[height, width] bool: the union of SAM's masks of the boxes (all False without a box).
    multimask: SAM's three candidate masks per box, all in the union (the paper's code)."""
    import torch
    if not boxes:
      return np.zeros((image.height, image.width), bool)
    inputs = self._sam_processor(images=image, input_boxes=[boxes], return_tensors="pt")
    with torch.no_grad():
      outputs = self._sam(**inputs.to(self.device), multimask_output=multimask)
    masks = self._sam_processor.image_processor.post_process_masks(
        outputs.pred_masks.cpu(), inputs["original_sizes"].cpu(),
        inputs["reshaped_input_sizes"].cpu())
    return masks[0].numpy().astype(bool).any((0, 1))
