"""open_clip models and CLIP embeddings of texts and images, with an on-disk image-embedding cache.

Any open_clip model loads: a built-in architecture with a pretrained tag or a local weights file
(`ViT-B-32` + `openai` or `/models/vit-b-32.safetensors`), or a model folder (`local-dir:PATH`,
e.g. the one `eval.tiny_clip` writes). Image embeddings are cached under
`CACHE/<model identity>/<batch digest>.npz`, keyed by the sha256 of each image's decoded pixels, so a
rerun, another selection of latents, or another TOPACTS over the same images embeds nothing twice.
"""

from __future__ import annotations

import concurrent.futures as futures
import contextlib
import dataclasses
import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from tqdm import tqdm

from sae_jax.files import atomic_write_bytes, sha256_file

PRECISIONS = ("fp32", "fp16", "bf16")


class ClipError(ValueError):
  """A CLIP model that cannot be loaded, or an unreadable embedding cache."""


@dataclasses.dataclass
class Clip:
  model: object  # open_clip.CLIP in eval mode
  preprocess: Callable[[Image.Image], object]  # PIL image -> [3, H, W] tensor
  tokenizer: Callable[[list[str]], object]
  identity: str  # digest of architecture + weights + precision: names the embedding cache
  device: str


def _weights_digest(model_name: str, pretrained: str | None) -> str:
  """What determines the weights: the files' contents when local, else the name and tag."""
  if model_name.startswith("local-dir:"):
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(model_name[len("local-dir:"):]).iterdir() if p.is_file()):
      digest.update(path.name.encode() + bytes.fromhex(sha256_file(path)))
    return digest.hexdigest()
  if pretrained and Path(pretrained).is_file():
    return sha256_file(Path(pretrained))
  return f"{model_name}|{pretrained}"


@contextlib.contextmanager
def _quiet_root_logger():
  """open_clip logs every step of loading at INFO on the root logger (which absl shows)."""
  root = logging.getLogger()
  level = root.level
  root.setLevel(max(level, logging.WARNING))
  try:
    yield
  finally:
    root.setLevel(level)


def load(model_name: str, pretrained: str | None, device: str = "cpu",
         precision: str = "fp32") -> Clip:
  import open_clip
  where = f"--clip_model={model_name} --clip_pretrained={pretrained}"
  has_schema = model_name.startswith(("local-dir:", "hf-hub:"))
  try:
    # A built-in name without weights would silently score with random ones: require them.
    with _quiet_root_logger():
      model, _, preprocess = open_clip.create_model_and_transforms(
          model_name, pretrained=None if has_schema else pretrained, precision=precision,
          device=device, require_pretrained=not has_schema, weights_only=True)
      tokenizer = open_clip.get_tokenizer(model_name)
  except (RuntimeError, ValueError, OSError, KeyError) as e:
    raise ClipError(f"{where}: cannot load the model ({type(e).__name__}: {e})") from e
  model.eval()
  identity = hashlib.sha256(json.dumps(
      [model_name.split(":", 1)[0] if has_schema else model_name,
       _weights_digest(model_name, pretrained), precision]).encode()).hexdigest()[:24]
  return Clip(model, preprocess, tokenizer, identity, device)


def image_key(image: Image.Image) -> str:
  """sha256 of the decoded pixels: the same picture from another path or dataset row hits."""
  digest = hashlib.sha256(f"{image.mode}{image.size}".encode())
  digest.update(image.tobytes())
  return digest.hexdigest()


class EmbeddingCache:
  """One .npz per embedded batch (keys [b] S64, embeddings [b, D] float32), written atomically."""

  def __init__(self, root: str | Path, identity: str):
    self.folder = Path(root) / identity
    self.folder.mkdir(parents=True, exist_ok=True)
    self._rows: dict[bytes, np.ndarray] = {}
    for path in sorted(self.folder.glob("*.npz")):
      try:
        with np.load(path, allow_pickle=False) as data:
          self._rows.update(zip(data["keys"].tolist(), data["embeddings"]))
      except (OSError, ValueError, KeyError) as e:
        raise ClipError(f"embedding cache file {path} is unreadable ({e}); delete it") from e

  def get(self, key: str) -> np.ndarray | None:
    return self._rows.get(key.encode())

  def put(self, keys: list[str], embeddings: np.ndarray) -> None:
    encoded = np.array([k.encode() for k in keys], dtype="S64")
    buffer = io.BytesIO()
    np.savez(buffer, keys=encoded, embeddings=embeddings.astype(np.float32))
    name = hashlib.sha256(encoded.tobytes()).hexdigest()[:32]
    atomic_write_bytes(self.folder / f"{name}.npz", buffer.getvalue())
    self._rows.update(zip(encoded.tolist(), embeddings.astype(np.float32)))


def _run_model(clip: Clip, encode, inputs) -> np.ndarray:
  import torch
  dtype = next(clip.model.parameters()).dtype
  with torch.inference_mode():
    inputs = inputs.to(clip.device)
    if inputs.is_floating_point():
      inputs = inputs.to(dtype)
    return encode(inputs).float().cpu().numpy()


def embed_texts(clip: Clip, texts: list[str], batch_size: int) -> np.ndarray:
  """[len(texts), D] float32 text embeddings (not normalised)."""
  out = [_run_model(clip, clip.model.encode_text, clip.tokenizer(texts[i:i + batch_size]))
         for i in range(0, len(texts), batch_size)]
  return np.concatenate(out)


def embed_images(clip: Clip, load_image: Callable[[int], Image.Image], image_ids: list[int],
                 cache: EmbeddingCache, batch_size: int, workers: int) -> tuple[np.ndarray, dict]:
  """[len(image_ids), D] float32 image embeddings (not normalised), and cache statistics.

  Images are decoded by `workers` threads one batch ahead of the model; only the ones missing
  from the cache are preprocessed and embedded.
  """
  import torch

  def prepare(image_id):
    image = load_image(image_id)
    key = image_key(image)
    return key, (None if cache.get(key) is not None else clip.preprocess(image))

  keys: list[str] = []
  computed = 0
  batches = [image_ids[i:i + batch_size] for i in range(0, len(image_ids), batch_size)]
  with futures.ThreadPoolExecutor(workers) as pool, \
      tqdm(total=len(image_ids), unit="image", desc="clip images", dynamic_ncols=True) as bar:
    ahead = pool.map(prepare, batches[0])
    for n in range(len(batches)):
      prepared = list(ahead)
      ahead = pool.map(prepare, batches[n + 1]) if n + 1 < len(batches) else None
      missing = [(key, tensor) for key, tensor in prepared if tensor is not None]
      if missing:
        embeddings = _run_model(clip, clip.model.encode_image,
                                torch.stack([tensor for _, tensor in missing]))
        cache.put([key for key, _ in missing], embeddings)
        computed += len(missing)
      keys += [key for key, _ in prepared]
      bar.update(len(prepared))
  counts = {"images": len(image_ids), "embedded": computed, "from_cache": len(image_ids) - computed}
  return np.stack([cache.get(key) for key in keys]), counts
