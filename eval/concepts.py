"""`python -m eval.concepts`: which planted concept each latent finds, on synthetic images.

  python -m eval.concepts --topacts=TOPACTS --concepts=IMAGES/concepts.jsonl --out=CONCEPTS \
      [--explanations=EXPL/explanations.jsonl]

`python -m harvest.images` records what it drew (IMAGES/concepts.jsonl, docs/formats.md): every
shape, colour and background texture is a concept with a mask. Each latent's top images' patch maps
are binarised (activation > --threshold) and compared with every concept's mask at the patch grid
(eval/metrics/iou.py); the latent's IoU with a concept is the mean over its top images, and its match is the
concept with the highest (latents with fewer than --min_images labelled top images are not
scored). A planted concept (one that covers a patch of some scanned image) is matched when some
latent reaches --match_iou on it.
The random baseline scores the same maps with their active patches moved at random. Writes:
  concepts.json      settings, counts, aggregates (n, mean, median, bootstrap 95% CI) and, per
                     planted concept, its best latent and IoU
                     and, with --explanations, how many latents that match a concept at
                     --match_iou have an explanation naming it (the concept's word, e.g. "red"),
                     against the explanations shuffled among them
  per_latent.jsonl   {"latent", "concept", "iou", "random_iou", "images", "explanation"} per latent
Top images are matched to concepts.jsonl by file name; images it does not list are left out.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from absl import flags

from eval.metrics import iou as iou_lib
from eval.metrics import ground_truth, stats
from harvest import images as images_lib
from interpret import jobs
from interpret import topacts as topacts_lib
from sae_jax import cli
from sae_jax.files import atomic_write_bytes, atomic_write_json

FORMAT_NAME, FORMAT_VERSION = "concept-iou", 1

_TOPACTS = flags.DEFINE_string("topacts", None, "TOPACTS folder (sae_jax.scan output).", required=True)
_CONCEPTS = flags.DEFINE_string("concepts", None, "concepts.jsonl written by harvest.images (or "
                                "its folder).", required=True)
_OUT = flags.DEFINE_string("out", None, "Output folder (see the module doc).", required=True)
_EXPLANATIONS = flags.DEFINE_string("explanations", None, "explanations.jsonl of interpret.explain, "
                                    "copied beside each latent's match (optional).")
_THRESHOLD = flags.DEFINE_float("threshold", iou_lib.DEFAULT_THRESHOLD, "A patch is in a latent's "
                                "mask when its activation exceeds this.")
_MATCH_IOU = flags.DEFINE_float("match_iou", 0.5, "IoU at which a latent matches a concept.")
_MIN_IMAGES = flags.DEFINE_integer("min_images", 3, "Score only latents with at least this many "
                                   "labelled top images: on one or two, any mask fits by chance.",
                                   lower_bound=1)
_RANDOM_DRAWS = flags.DEFINE_integer("random_draws", 10, "Random placements of each map for the "
                                     "baseline.", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random baseline and the bootstrap.")
_BOOTSTRAP = flags.DEFINE_integer("bootstrap", 1000, "Bootstrap resamples of the latents for the "
                                  "95% intervals (0: none).", lower_bound=0)


class ConceptsError(ValueError):
  """A concepts.jsonl that cannot be read, or one that names none of the scanned images."""


def read_concepts(path: Path) -> dict[str, dict]:
  """{image file name: scene record} of a concepts.jsonl (or of the one in a folder)."""
  path = path / images_lib.CONCEPTS_FILE if path.is_dir() else path
  scenes = {}
  try:
    lines = path.read_text().splitlines()
  except OSError as e:
    raise ConceptsError(f"--concepts={path}: cannot read it ({e})") from e
  for line_no, line in enumerate(lines, 1):
    try:
      record = json.loads(line)
      images_lib.concept_masks(record)  # a record it cannot draw fails here, with its line
      scenes[record["image"]] = record
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
      raise ConceptsError(f"--concepts={path}:{line_no}: not a scene record of harvest.images "
                          f"({type(e).__name__}: {e})") from e
  return scenes


class GridMasks:
  """Each scanned image's concept masks at the patch grid, [concepts, patches]."""

  def __init__(self, acts, scenes: dict[str, dict]):
    self._masks = {}  # image id -> {concept: [patches] bool}, for the images concepts.jsonl lists
    for record in acts.images():
      scene = scenes.get(Path(record["source"]).name)
      if scene is not None:
        self._masks[int(record["id"])] = {
            name: iou_lib.mask_to_grid(mask, acts.grid)
            for name, mask in images_lib.concept_masks(scene).items()}
    # A concept that covers no patch anywhere (a thin line on a coarse grid) cannot be found.
    self.names = sorted({name for masks in self._masks.values()
                         for name, mask in masks.items() if mask.any()})
    self._patches = acts.grid[0] * acts.grid[1]

  def labelled(self, image_id: int) -> bool:
    return image_id in self._masks

  def __call__(self, image_id: int) -> np.ndarray:
    masks = self._masks[image_id]
    empty = np.zeros(self._patches, bool)
    return np.stack([masks.get(name, empty) for name in self.names])


def score(acts, masks: GridMasks, threshold: float, min_images: int, draws: int, seed: int):
  """Per-latent rows, and the [latents, concepts] IoU of the real and of the shuffled maps."""
  rng = np.random.default_rng(seed)
  rows, real, shuffled = [], [], []
  for index in np.flatnonzero(acts.has_images()):
    latent = acts.latent(int(index))
    keep = [n for n, i in enumerate(latent.image_ids) if masks.labelled(int(i))]
    if len(keep) < min_images:
      continue
    pred = iou_lib.binarise(latent.maps[keep], threshold)
    targets = np.stack([masks(int(latent.image_ids[n])) for n in keep])
    per_concept = iou_lib.mean_iou(pred, targets)
    random = iou_lib.random_mean_iou(pred, targets, draws, rng)
    best = int(np.nanargmax(per_concept)) if np.isfinite(per_concept).any() else None
    rows.append({"latent": int(index), "images": len(keep),
                 "concept": None if best is None else masks.names[best],
                 "iou": None if best is None else float(per_concept[best]),
                 # The baseline picks its own best concept, as the real maps do.
                 "random_iou": float(np.nanmax(random)) if np.isfinite(random).any() else None})
    real.append(per_concept)
    shuffled.append(random)
  shape = (len(rows), len(masks.names))
  return rows, np.reshape(real, shape), np.reshape(shuffled, shape)


def planted(names: list[str], latents: list[int], real: np.ndarray, shuffled: np.ndarray,
            match_iou: float) -> dict:
  """Per concept: the latent with the highest IoU on it, that IoU, whether it reaches `match_iou`,
  and the highest IoU of the shuffled maps."""
  out = {}
  for c, name in enumerate(names):
    column = np.nan_to_num(real[:, c], nan=-1.0)
    best = int(np.argmax(column)) if len(column) and column.max() >= 0 else None
    top = None if best is None else float(column[best])
    out[name] = {"latent": None if best is None else latents[best], "iou": top,
                 "matched": top is not None and top >= match_iou,
                 "random_iou": float(np.nanmax(shuffled[:, c]))
                 if np.isfinite(shuffled[:, c]).any() else None}
  return out


def main():
  out = Path(_OUT.value)
  acts = topacts_lib.TopActs(_TOPACTS.value)
  masks = GridMasks(acts, read_concepts(Path(_CONCEPTS.value)))
  if not masks.names:
    raise ConceptsError(f"--concepts={_CONCEPTS.value} names none of the images of --topacts="
                        f"{_TOPACTS.value} (matched by file name)")
  records = jobs.read_explanations(Path(_EXPLANATIONS.value)) if _EXPLANATIONS.value else {}
  rows, real, shuffled = score(acts, masks, _THRESHOLD.value, _MIN_IMAGES.value,
                               _RANDOM_DRAWS.value, _SEED.value)
  for row in rows:
    row["explanation"] = (records.get(row["latent"]) or {}).get("explanation")
  concepts = planted(masks.names, [r["latent"] for r in rows], real, shuffled, _MATCH_IOU.value)
  summary = {
      "format": FORMAT_NAME, "version": FORMAT_VERSION,
      "settings": {"topacts": _TOPACTS.value, "concepts": _CONCEPTS.value,
                   "threshold": _THRESHOLD.value, "match_iou": _MATCH_IOU.value,
                   "min_images": _MIN_IMAGES.value,
                   "random_draws": _RANDOM_DRAWS.value, "seed": _SEED.value,
                   "grid": list(acts.grid), "covered": iou_lib.COVERED},
      "latents": {"scored": len(rows), "with_images": int(acts.has_images().sum())},
      "metrics": {name: stats.summarize([r[name] for r in rows], _BOOTSTRAP.value, _SEED.value)
                  for name in ("iou", "random_iou")},
      "planted": len(concepts), "matched": sum(c["matched"] for c in concepts.values()),
      "matched_random": sum(c["random_iou"] is not None and c["random_iou"] >= _MATCH_IOU.value
                            for c in concepts.values()),
      "concepts": concepts}
  if _EXPLANATIONS.value:
    summary["explanations"] = ground_truth.explanation_accuracy(rows, _MATCH_IOU.value, _RANDOM_DRAWS.value,
                                                   _SEED.value)
  out.mkdir(parents=True, exist_ok=True)
  atomic_write_bytes(out / "per_latent.jsonl",
                     "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode())
  atomic_write_json(out / "concepts.json", summary)
  print(json.dumps({"ok": True, "scored": len(rows), "planted": summary["planted"],
                    **({"explanations": summary["explanations"]} if _EXPLANATIONS.value else {}),
                    "matched": summary["matched"], "matched_random": summary["matched_random"],
                    "mean_iou": summary["metrics"]["iou"]["mean"],
                    "mean_random_iou": summary["metrics"]["random_iou"]["mean"], "out": str(out)}))


if __name__ == "__main__":
  cli.run(main, (topacts_lib.TopActsError, jobs.ResultsError, ConceptsError))
