"""`python -m eval.grounded_iou`: the paper's IoU between explanations and activation maps.

  python -m eval.grounded_iou --topacts=TOPACTS --explanations=EXPL/explanations.jsonl \
      --grounding_dino=/models/grounding-dino-base --sam=/models/sam-vit-huge --out=GROUNDED

For each explained latent and each top image the explainer saw (the record's `images`, else the
first --shown): GroundingDINO finds the explanation's boxes, SAM segments them (eval/grounding.py),
and the union of their masks is compared with the latent's map binarised at activation > --threshold, on the patch
grid (eval/iou.py: a patch is in the mask when at least half of it is). An image where no box passes
the thresholds has an empty mask. A latent's IoU is the mean over its images; the random baseline
scores the same maps with their active patches placed at random. Writes:
  grounded_iou.json   settings, counts, aggregates (n, mean, median, bootstrap 95% CI)
  per_latent.jsonl    {"latent", "explanation", "iou", "random_iou", "images": [{"id", "boxes", "iou"}]}
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
from absl import flags
from tqdm import tqdm

from eval import grounding, stats
from eval import iou as iou_lib
from harvest.images import BadImage
from interpret import jobs, prompts, sources
from interpret import topacts as topacts_lib
from sae_jax import cli
from sae_jax.store import StoreError, atomic_write_bytes, atomic_write_json

FORMAT_NAME, FORMAT_VERSION = "grounded-iou", 1

_TOPACTS = flags.DEFINE_string("topacts", None, "TOPACTS folder (sae_jax.scan output).", required=True)
_EXPLANATIONS = flags.DEFINE_string("explanations", None, "explanations.jsonl of interpret.explain "
                                    "(or its folder).", required=True)
_GROUNDING_DINO = flags.DEFINE_string("grounding_dino", None, "Local folder of a GroundingDINO "
                                      "checkpoint and processor (from_pretrained).", required=True)
_SAM = flags.DEFINE_string("sam", None, "Local folder of a SAM checkpoint and processor.",
                           required=True)
_OUT = flags.DEFINE_string("out", None, "Output folder (see the module doc).", required=True)
_STORE = flags.DEFINE_string("store", None, "Activation store whose image table names the images "
                             "(default: TOPACTS/images.jsonl).")
_IMAGE_ROOT = flags.DEFINE_string("image_root", None, "Folder relative image paths are relative to.")
_THRESHOLD = flags.DEFINE_float("threshold", iou_lib.DEFAULT_THRESHOLD, "A patch is in a latent's "
                                "mask when its activation exceeds this.")
_BOX_THRESHOLD = flags.DEFINE_float("box_threshold", 0.3, "GroundingDINO box score threshold (the "
                                    "paper's code: 0.3).")
_TEXT_THRESHOLD = flags.DEFINE_float("text_threshold", 0.25, "GroundingDINO text threshold.")
_SHOWN = flags.DEFINE_integer("shown", 5, "Top images per latent when its explanation does not "
                              "list the ones shown.", lower_bound=1)
_RANDOM_DRAWS = flags.DEFINE_integer("random_draws", 10, "Random placements of each map for the "
                                     "baseline.", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random baseline and the bootstrap.")
_BOOTSTRAP = flags.DEFINE_integer("bootstrap", 1000, "Bootstrap resamples of the latents for the "
                                  "95% intervals (0: none).", lower_bound=0)
_DEVICE = flags.DEFINE_string("device", None, "Torch device (default: cuda when available).")
topacts_lib.define_selection_flags(flags)


def score(acts, records: dict[int, dict], latents: list[int], table, grounder) -> list[dict]:
  rng = np.random.default_rng(_SEED.value)
  rows = []
  for index in tqdm(latents, unit="latent", desc="grounded IoU"):
    latent, record = acts.latent(index), records[index]
    wanted = [int(i) for i in record.get("images") or latent.image_ids[:_SHOWN.value]]
    rank = {int(i): n for n, i in enumerate(latent.image_ids)}
    used, found, masks, errors = [], [], [], []
    for image_id in (i for i in wanted if i in rank):
      try:
        image = table.load(image_id)
      except BadImage as e:
        errors.append(str(e))
        continue
      boxes = grounder.boxes(image, record["explanation"])
      used.append(image_id)
      found.append(boxes)
      masks.append(iou_lib.mask_to_grid(grounder.mask(image, boxes), acts.grid))
    row = {"latent": index, "explanation": record["explanation"], "iou": None,
           "random_iou": None, "images": [], "errors": errors}
    if used:
      pred = iou_lib.binarise(latent.maps[[rank[i] for i in used]], _THRESHOLD.value)
      row["iou"], row["random_iou"], per_image = iou_lib.against_masks(
          pred, np.stack(masks), _RANDOM_DRAWS.value, rng)
      row["images"] = [{"id": i, "boxes": b, "iou": v} for i, b, v in zip(used, found, per_image)]
    rows.append(row)
  return rows


def main():
  out = Path(_OUT.value)
  acts = topacts_lib.TopActs(_TOPACTS.value)
  records = jobs.read_explanations(Path(_EXPLANATIONS.value))
  explained = {i for i, r in records.items() if r["status"] == prompts.OK}
  latents, skipped = topacts_lib.selection_from_flags(acts, flags.FLAGS, restrict_to=explained)
  if not latents:
    raise grounding.GroundingError(f"--explanations={_EXPLANATIONS.value}: no latent with an ok "
                                   f"explanation and top images to ground")
  device = _DEVICE.value
  if device is None:
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
  grounder = grounding.Grounder(_GROUNDING_DINO.value, _SAM.value, device, _BOX_THRESHOLD.value,
                                _TEXT_THRESHOLD.value)
  rows = score(acts, records, latents, sources.open_table(acts, _STORE.value, _IMAGE_ROOT.value),
               grounder)
  settings = {name: flags.FLAGS[name].value for name in (
      "topacts", "explanations", "grounding_dino", "sam", "threshold", "box_threshold",
      "text_threshold", "shown", "random_draws", "seed", "bootstrap")}
  summary = {
      "format": FORMAT_NAME, "version": FORMAT_VERSION,
      "settings": {**settings, "device": device, "grid": list(acts.grid),
                   "covered": iou_lib.COVERED},
      "latents": {"selected": len(latents), "scored": sum(r["iou"] is not None for r in rows),
                  "skipped_no_images": skipped},
      "images": dict(collections.Counter(
          "boxed" if image["boxes"] else "no box" for r in rows for image in r["images"])),
      "metrics": {name: stats.summarize([r[name] for r in rows], _BOOTSTRAP.value, _SEED.value)
                  for name in ("iou", "random_iou")}}
  out.mkdir(parents=True, exist_ok=True)
  atomic_write_bytes(out / "per_latent.jsonl",
                     "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode())
  atomic_write_json(out / "grounded_iou.json", summary)
  print(json.dumps({"ok": True, **summary["latents"], "iou": summary["metrics"]["iou"]["mean"],
                    "random_iou": summary["metrics"]["random_iou"]["mean"], "out": str(out)}))


if __name__ == "__main__":
  cli.run(main, (topacts_lib.TopActsError, StoreError, jobs.ResultsError,
                 grounding.GroundingError))
