"""TOPACTS, the top-activating images of every latent: the one definition of the format.

`sae_jax.scan` writes it with `write`; `TopActs` reads it (docs/formats.md has the layout):

  TOPACTS/<name>.npy    top_images, top_scores, top_maps, density, histogram
  TOPACTS/modality_mass.npy, top_text_{rows,values,images,positions}.npy   (optional: scans
                        before the modality profile lack them)
  TOPACTS/images.jsonl  the scanned store's image table
  TOPACTS/topacts.json  the header, written last: a folder without it is an unfinished scan

numpy alone reads every file. `TopActs` memory-maps the arrays, so opening the top images of 131k
latents costs nothing until a latent's rows are touched. It needs no jax (the torch side reads it).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from sae_jax.files import atomic_save_npy, atomic_write_bytes, atomic_write_json

FORMAT_NAME = "sae-topacts"
FORMAT_VERSION = 1
HEADER = "topacts.json"
IMAGES = "images.jsonl"
ARRAYS = {"top_images": np.int64, "top_scores": np.float32, "top_maps": np.float16,
          "density": np.float64, "histogram": np.int64}
# The modality profile and top text rows: all present or all absent (a TOPACTS of an older scan).
TEXT_ARRAYS = {"modality_mass": np.float64, "top_text_rows": np.int64,
               "top_text_values": np.float32, "top_text_images": np.int64,
               "top_text_positions": np.int32}
# A latent fires on both modalities when min(image share, text share) / max(...) >= this.
BOTH_THRESHOLD = 0.1
MODALITIES = ("image", "text", "both", "dead")


class TopActsError(ValueError):
  """A TOPACTS folder that is missing, malformed or inconsistent, or a bad latent selection."""


def expected_shapes(header: dict) -> dict[str, tuple[int, ...]]:
  n, top_n = int(header["num_latents"]), int(header["top_n"])
  patches = int(np.prod(header["grid"]))
  return {"top_images": (n, top_n), "top_scores": (n, top_n), "top_maps": (n, top_n, patches),
          "density": (n,), "histogram": (n, len(header["hist_edges"]) - 1)}


def text_shapes(header: dict) -> dict[str, tuple[int, ...]]:
  n, top_n = int(header["num_latents"]), int(header["top_n"])
  return {"modality_mass": (n, 3), **{name: (n, top_n) for name in TEXT_ARRAYS
                                      if name != "modality_mass"}}


def modality_profile(mass: np.ndarray, threshold: float = BOTH_THRESHOLD) -> dict[str, np.ndarray]:
  """Per latent, from its activation mass per token kind [n, 3] (image_base, image_other, text):

  image_share, text_share: fractions of the latent's total activation on image tokens (both image
  kinds) and on text tokens; both: min(image_share, text_share) / max(...), 1 when the two are
  equal, 0 for a latent that never fires on one of them; modality: "dead" (no mass), "both"
  (both >= threshold), else "image" or "text", whichever holds the larger share.
  """
  mass = np.asarray(mass, np.float64)
  image, text = mass[:, 0] + mass[:, 1], mass[:, 2]
  total = image + text
  safe = np.where(total > 0, total, 1.0)
  image_share, text_share = image / safe, text / safe
  hi = np.maximum(image_share, text_share)
  both = np.minimum(image_share, text_share) / np.where(hi > 0, hi, 1.0)
  modality = np.where(total <= 0, "dead", np.where(
      both >= threshold, "both", np.where(image_share >= text_share, "image", "text")))
  return {"image_share": image_share, "text_share": text_share, "both": both,
          "modality": modality.astype(object)}


def write(path: str | Path, header: dict, arrays: dict[str, np.ndarray],
          images: list[dict]) -> None:
  """Writes a finished TOPACTS, each file atomically and the header last.

  `header` holds num_latents, top_n, grid, hist_edges and the scan's provenance; format, version
  and complete are added here.
  """
  path = Path(path)
  shapes = expected_shapes(header)
  if any(name in arrays for name in TEXT_ARRAYS):
    shapes.update(text_shapes(header))
  for name, shape in shapes.items():
    array = np.asarray(arrays[name], {**ARRAYS, **TEXT_ARRAYS}[name])
    if array.shape != shape:
      raise TopActsError(f"{name} has shape {array.shape}, expected {shape} from the header")
    atomic_save_npy(path / f"{name}.npy", array)
  atomic_write_bytes(path / IMAGES, "".join(json.dumps(r) + "\n" for r in images).encode())
  atomic_write_json(path / HEADER, {**header, "format": FORMAT_NAME, "version": FORMAT_VERSION,
                                    "complete": True})


@dataclasses.dataclass(frozen=True)
class Latent:
  """One latent's top images (best first; empty slots dropped) and statistics."""
  index: int
  image_ids: np.ndarray  # [m] int64
  scores: np.ndarray  # [m] float32
  maps: np.ndarray  # [m, h*w] float32 activation on each base-grid patch
  density: float
  histogram: np.ndarray  # [bins] int64


@dataclasses.dataclass(frozen=True)
class TextRow:
  """One of a latent's top text tokens: where it is in the store and how strongly it fired."""
  row: int  # store row
  image_id: int  # the input (image and prompt) the token belongs to
  position: int  # token position in the prompt sequence
  value: float


class TopActs:
  """A finished TOPACTS folder, memory-mapped; raises TopActsError naming what is wrong."""

  def __init__(self, path: str | Path):
    self.path = Path(path)
    header_path = self.path / HEADER
    if not header_path.exists():
      raise TopActsError(f"{self.path} is not a finished TOPACTS folder: {header_path} is missing "
                         "(a scan writes it last; rerun a killed scan with the same flags)")
    self.header = json.loads(header_path.read_text())
    if self.header.get("format") != FORMAT_NAME or self.header.get("version") != FORMAT_VERSION:
      raise TopActsError(f"{header_path}: format {self.header.get('format')!r} version "
                         f"{self.header.get('version')!r}, expected {FORMAT_NAME!r} "
                         f"{FORMAT_VERSION}")
    if not self.header.get("complete"):
      raise TopActsError(f"{header_path}: the scan has not finished (complete: false)")
    arrays = {}
    for name, shape in expected_shapes(self.header).items():
      f = self.path / f"{name}.npy"
      try:
        arrays[name] = np.load(f, mmap_mode="r", allow_pickle=False)
      except (OSError, ValueError) as e:
        raise TopActsError(f"cannot read {f}: {e}") from e
      if arrays[name].shape != shape:
        raise TopActsError(f"{f} has shape {arrays[name].shape}, expected {shape} (from {HEADER})")
    self.num_latents = int(self.header["num_latents"])
    self.grid = tuple(int(v) for v in self.header["grid"])
    self.hist_edges = np.asarray(self.header["hist_edges"], np.float64)
    self.top_images, self.top_scores = arrays["top_images"], arrays["top_scores"]
    self.top_maps, self.histograms = arrays["top_maps"], arrays["histogram"]
    self.density = np.asarray(arrays["density"])
    self.text = None  # the modality arrays, or None for a scan that did not record them
    if (self.path / "modality_mass.npy").exists():
      self.text = {}
      for name, shape in text_shapes(self.header).items():
        f = self.path / f"{name}.npy"
        try:
          self.text[name] = np.load(f, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
          raise TopActsError(f"cannot read {f}: {e}") from e
        if self.text[name].shape != shape:
          raise TopActsError(f"{f} has shape {self.text[name].shape}, expected {shape}")

  def __len__(self) -> int:
    return self.num_latents

  def latent(self, index: int) -> Latent:
    if not 0 <= index < self.num_latents:
      raise TopActsError(f"latent {index} out of range: {self.path} has {self.num_latents} latents")
    ids = np.asarray(self.top_images[index])
    keep = ids >= 0
    return Latent(index=index, image_ids=ids[keep],
                  scores=np.asarray(self.top_scores[index])[keep].astype(np.float32),
                  maps=np.asarray(self.top_maps[index])[keep].astype(np.float32),
                  density=float(self.density[index]),
                  histogram=np.asarray(self.histograms[index]))

  def has_text(self) -> bool:
    """Whether the scan recorded text rows: a modality profile and top text rows exist, and the
    store held text rows (a base_patches store has none)."""
    return self.text is not None and self.header.get("rows_by_kind", {}).get("text", 0) > 0

  def modality(self, threshold: float = BOTH_THRESHOLD) -> dict[str, np.ndarray] | None:
    """`modality_profile` of every latent, or None if the scan did not record one."""
    if self.text is None:
      return None
    return modality_profile(np.asarray(self.text["modality_mass"]), threshold)

  def text_rows(self, index: int) -> list[TextRow]:
    """The latent's top text rows, best first; [] if none or not recorded."""
    if self.text is None:
      return []
    if not 0 <= index < self.num_latents:
      raise TopActsError(f"latent {index} out of range: {self.path} has {self.num_latents} latents")
    t = {name: np.asarray(a[index]) for name, a in self.text.items() if name != "modality_mass"}
    return [TextRow(int(r), int(i), int(p), float(v)) for r, i, p, v in zip(
        t["top_text_rows"], t["top_text_images"], t["top_text_positions"], t["top_text_values"])
        if r >= 0]

  def has_text_rows(self) -> np.ndarray:
    """[num_latents] bool: the latent has at least one top text row."""
    if self.text is None:
      return np.zeros(self.num_latents, bool)
    return np.asarray(self.text["top_text_rows"][:, 0]) >= 0

  def has_images(self) -> np.ndarray:
    """[num_latents] bool: the latent has at least one top image."""
    return np.asarray(self.top_images[:, 0]) >= 0

  def images(self) -> list[dict]:
    """The image table saved next to the arrays (id, source, prompt, grid), in id order."""
    with open(self.path / IMAGES) as f:
      return [json.loads(line) for line in f if line.strip()]
