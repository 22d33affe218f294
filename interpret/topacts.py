"""Reader of TOPACTS (`sae_jax.scan`'s output, docs/formats.md) and the choice of latents to work on.

Arrays are memory-mapped, so opening the top images of 131k latents costs nothing until a latent's
rows are touched.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

FORMAT_NAME = "sae-topacts"
FORMAT_VERSION = 1
ARRAYS = ("top_images", "top_scores", "top_maps", "density", "histogram")


class TopActsError(ValueError):
  """A TOPACTS folder that is missing, malformed or inconsistent, or a bad latent selection."""


@dataclasses.dataclass(frozen=True)
class Latent:
  """One latent's top images (best first; empty slots dropped) and statistics."""
  index: int
  image_ids: np.ndarray  # [m] int64
  scores: np.ndarray  # [m] float32
  maps: np.ndarray  # [m, h*w] float32 activation on each base-grid patch
  density: float
  histogram: np.ndarray  # [bins] int64


class TopActs:

  def __init__(self, path: str | Path):
    self.path = Path(path)
    header_path = self.path / "topacts.json"
    if not header_path.exists():
      raise TopActsError(f"{self.path} is not a TOPACTS folder: {header_path} is missing")
    self.header = json.loads(header_path.read_text())
    if self.header.get("format") != FORMAT_NAME or self.header.get("version") != FORMAT_VERSION:
      raise TopActsError(f"{header_path}: format {self.header.get('format')!r} version "
                         f"{self.header.get('version')!r}, expected {FORMAT_NAME!r} {FORMAT_VERSION}")
    arrays = {}
    for name in ARRAYS:
      f = self.path / f"{name}.npy"
      try:
        arrays[name] = np.load(f, mmap_mode="r", allow_pickle=False)
      except (OSError, ValueError) as e:
        raise TopActsError(f"cannot read {f}: {e}") from e
    self.num_latents = int(self.header["num_latents"])
    self.grid = tuple(int(v) for v in self.header["grid"])
    self.hist_edges = np.asarray(self.header["hist_edges"], np.float64)
    top_n, patches = int(self.header["top_n"]), self.grid[0] * self.grid[1]
    expected = {"top_images": (self.num_latents, top_n), "top_scores": (self.num_latents, top_n),
                "top_maps": (self.num_latents, top_n, patches), "density": (self.num_latents,),
                "histogram": (self.num_latents, len(self.hist_edges) - 1)}
    for name, shape in expected.items():
      if arrays[name].shape != shape:
        raise TopActsError(f"{self.path}/{name}.npy has shape {arrays[name].shape}, expected {shape} "
                           "(from topacts.json)")
    self.top_images, self.top_scores = arrays["top_images"], arrays["top_scores"]
    self.top_maps, self.histograms = arrays["top_maps"], arrays["histogram"]
    self.density = np.asarray(arrays["density"])

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

  def has_images(self) -> np.ndarray:
    """[num_latents] bool: the latent has at least one top image."""
    return np.asarray(self.top_images[:, 0]) >= 0

  def images(self) -> list[dict]:
    """The image table saved next to the arrays (id, source, prompt, grid), in id order."""
    with open(self.path / "images.jsonl") as f:
      return [json.loads(line) for line in f if line.strip()]


def parse_latent_spec(spec: str) -> list[int]:
  """'1,5,10-20' -> [1, 5, 10, ..., 20] (ranges inclusive), in the order given, without repeats."""
  out: dict[int, None] = {}
  for part in (p.strip() for p in spec.split(",")):
    if not part:
      continue
    lo, sep, hi = part.partition("-")
    try:
      first, last = int(lo), int(hi) if sep else int(lo)
    except ValueError:
      raise TopActsError(f"--latents: {part!r} is neither an integer nor a range like 10-20") from None
    if last < first:
      raise TopActsError(f"--latents: range {part!r} is empty")
    out.update(dict.fromkeys(range(first, last + 1)))
  return list(out)


def select_latents(topacts: TopActs, spec: str | None = None, min_density: float = 0.0,
                   max_density: float = 1.0, max_latents: int | None = None,
                   restrict_to: set[int] | None = None) -> tuple[list[int], int]:
  """The latents to work on and how many of them were dropped for having no top image.

  `spec` ('1,5,10-20', None = all) is filtered by density (inclusive bounds), by `restrict_to`
  (e.g. the latents that have an explanation), then cut to the first `max_latents`.
  """
  if spec:
    chosen = parse_latent_spec(spec)
    bad = [i for i in chosen if not 0 <= i < len(topacts)]
    if bad:
      raise TopActsError(f"--latents names {bad[:5]} but {topacts.path} has latents "
                         f"0..{len(topacts) - 1}")
  else:
    chosen = range(len(topacts))
  density, has_images = topacts.density, topacts.has_images()
  chosen = [i for i in chosen if min_density <= density[i] <= max_density
            and (restrict_to is None or i in restrict_to)]
  with_images = [i for i in chosen if has_images[i]]
  skipped = len(chosen) - len(with_images)
  if max_latents is not None:
    with_images = with_images[:max_latents]
  return with_images, skipped


def define_selection_flags(flags) -> None:
  """The latent-selection flags shared by `interpret.explain` and `interpret.dashboard`."""
  flags.DEFINE_string("latents", None, "Latents to use, e.g. '1,5,10-20' (default: all).")
  flags.DEFINE_float("min_density", 0.0, "Skip latents that fire on a smaller fraction of tokens.")
  flags.DEFINE_float("max_density", 1.0, "Skip latents that fire on a larger fraction of tokens.")
  flags.DEFINE_integer("max_latents", None, "Use at most this many latents (after the filters).")


def selection_from_flags(topacts: TopActs, flag_values, restrict_to: set[int] | None = None):
  return select_latents(topacts, flag_values.latents, flag_values.min_density,
                        flag_values.max_density, flag_values.max_latents, restrict_to)
