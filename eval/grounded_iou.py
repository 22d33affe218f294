"""`python -m eval.grounded_iou`: IoU between explanations and activation maps, two ways.

  python -m eval.grounded_iou --method=paper --topacts=TOPACTS --explanations=EXPL/explanations.jsonl \
      --labels=SCORES/labels.jsonl --store=STORE --sae=EXPORT \
      --grounding_dino=/models/grounding-dino-base --sam=/models/sam-vit-huge --out=GROUNDED_PAPER
  python -m eval.grounded_iou --method=patch --topacts=TOPACTS --explanations=EXPL/explanations.jsonl \
      --grounding_dino=/models/grounding-dino-base --sam=/models/sam-vit-huge --out=GROUNDED_PATCH

Both score each explained latent on the top images the explainer saw (the record's `images`, else
the first --shown): GroundingDINO finds boxes, SAM segments them (eval/models/grounding.py), and the union
of their masks is compared with the latent's map. A latent's IoU is the mean over its images.

--method=paper is the paper's computation, exactly (eval/metrics/paper_iou.py; the paper's 0.31 and random
0.005 are numbers of this method): pixel IoU at 336 x 336 of the map binarised at 1e-5 and upsampled
bilinearly (pixels < 224), grounding the label refined from the explanation (--labels: labels.jsonl
of `eval.clip_score --refine=... --refine_template=paper:CLONE`, the paper's prompt) in the squashed
336 px image, all SAM candidate masks of every box over --box_threshold; no box counts 0. Random
baseline: --random_draws trials of --shown random images of the whole image set per latent, scored with
the latent's own maps there (computed from --store with --sae).

--method=patch is ours (eval/metrics/iou.py): the raw explanation is grounded in the whole image, the mask
brought to the patch grid laid over the part of the image the model's base view covers (--base_view:
the squashed whole for LLaVA-NeXT, the centre square for LLaVA-1.5; a patch is in the mask when at
least half of it is) and compared
with the map binarised at activation > --threshold; an image where no box passes has an empty mask.
Random baseline: the same maps with their active patches placed at random, --random_draws times.

Writes:
  grounded_iou.json   settings (with the method), counts, aggregates (n, mean, median, bootstrap 95% CI)
  per_latent.jsonl    {"latent", "explanation", "label", "iou", "random_iou", "images": [{"id",
                      "boxes", "iou"}]} (paper: also "random_trials", each trial's IoU)
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
from absl import flags
from tqdm import tqdm

from eval.metrics import paper_iou, stats
from eval.models import grounding
from eval.metrics import iou as iou_lib
from harvest.images import BadImage
from interpret.sae import SAE
from interpret import jobs, prompts, sources, visual
from interpret import topacts as topacts_lib
from sae_jax import cli
from sae_jax.store import Store, StoreError
from sae_jax.files import atomic_write_bytes, atomic_write_json

FORMAT_NAME, FORMAT_VERSION = "grounded-iou", 1

METHODS = ("paper", "patch")
_METHOD = flags.DEFINE_enum("method", "patch", list(METHODS), "paper: the paper's pixel IoU of "
                            "refined labels with random images as baseline; patch: ours, on the patch "
                            "grid with shuffled maps as baseline (see the module doc).")
_LABELS = flags.DEFINE_string("labels", None, "--method=paper: labels.jsonl of eval.clip_score "
                              "--refine (the refined label of each explanation).")
_SAE = flags.DEFINE_string("sae", None, "--method=paper: the SAE export the scan used; it encodes "
                           "--store's rows of the random images.")
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
_THRESHOLD = flags.DEFINE_float("threshold", iou_lib.DEFAULT_THRESHOLD, "--method=patch: a patch "
                                "is in a latent's mask when its activation exceeds this.")
_BOX_THRESHOLD = flags.DEFINE_float("box_threshold", 0.3, "GroundingDINO box score threshold (the "
                                    "paper's code: 0.3).")
_TEXT_THRESHOLD = flags.DEFINE_float("text_threshold", 0.25, "GroundingDINO text threshold.")
_BASE_VIEW = flags.DEFINE_enum("base_view", None, list(visual.VIEWS), "--method=patch: how the "
                               "model's base grid sees an image: squash (LLaVA-NeXT / OneVision "
                               "any-res base image) or center_crop (LLaVA-1.5); default: each "
                               "image record's \"view\", else squash. (The paper squashes.)")
_SHOWN = flags.DEFINE_integer("shown", 5, "Top images per latent when its explanation does not "
                              "list the ones shown.", lower_bound=1)
_RANDOM_DRAWS = flags.DEFINE_integer("random_draws", 10, "Random baseline trials: random images "
                                     "per latent (paper) or placements of each map (patch).",
                                     lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random baseline and the bootstrap.")
_BOOTSTRAP = flags.DEFINE_integer("bootstrap", 1000, "Bootstrap resamples of the latents for the "
                                  "95% intervals (0: none).", lower_bound=0)
_DEVICE = flags.DEFINE_string("device", None, "Torch device (default: cuda when available).")
topacts_lib.define_selection_flags(flags)


def score_patch(acts, records: dict[int, dict], latents: list[int], table, grounder) -> list[dict]:
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
      view = _BASE_VIEW.value or table.record(image_id).get("view", "squash")
      masks.append(iou_lib.mask_to_grid(grounder.mask(image, boxes), acts.grid, view))
    row = {"latent": index, "explanation": record["explanation"], "label": None, "iou": None,
           "random_iou": None, "images": [], "errors": errors}
    if used:
      pred = iou_lib.binarise(latent.maps[[rank[i] for i in used]], _THRESHOLD.value)
      row["iou"], row["random_iou"], per_image = iou_lib.against_masks(
          pred, np.stack(masks), _RANDOM_DRAWS.value, rng)
      row["images"] = [{"id": i, "boxes": b, "iou": v} for i, b, v in zip(used, found, per_image)]
    rows.append(row)
  return rows


def _finite(value: float | None) -> float | None:
  return value if value is not None and np.isfinite(value) else None


def score_paper(acts, records: dict[int, dict], labels: dict[int, str], latents: list[int], table,
                grounder, store, sae) -> list[dict]:
  rows = []
  for index in tqdm(latents, unit="latent", desc="grounded IoU (paper)"):
    latent, record = acts.latent(index), records[index]
    wanted = [int(i) for i in record.get("images") or latent.image_ids[:_SHOWN.value]]
    rank = {int(i): n for n, i in enumerate(latent.image_ids)}
    row = {"latent": index, "explanation": record["explanation"], "label": labels[index],
           "iou": None, "random_iou": None, "random_trials": [], "images": [], "errors": []}
    values = []
    for image_id in (i for i in wanted if i in rank):
      try:
        image = table.load(image_id)
      except BadImage as e:
        row["errors"].append(str(e))
        continue
      boxes, value = paper_iou.image_iou(grounder, image, labels[index],
                                         latent.maps[rank[image_id]], acts.grid)
      values.append(value)
      row["images"].append({"id": image_id, "boxes": boxes, "iou": _finite(value)})
    if values:
      row["iou"] = _finite(paper_iou.latent_iou(values))
    rows.append(row)
  scored = [r for r in rows if r["images"]]
  population = np.asarray(sorted(int(r["id"]) for r in store.images()), np.int64)
  drawn = population[paper_iou.random_draws(len(population), _SHOWN.value, _RANDOM_DRAWS.value,
                                            len(scored), _SEED.value)]
  latent_of = np.asarray([r["latent"] for r in scored], np.int64)[None, :, None]
  pairs = np.stack(np.broadcast_arrays(drawn, latent_of), -1)  # [trials, latents, shown, 2]
  maps = paper_iou.latent_maps(store, sae, pairs, int(np.prod(acts.grid)))
  silent = np.zeros(int(np.prod(acts.grid)), np.float32)
  for trial in tqdm(drawn, unit="trial", desc="random images (paper)"):
    for row, images in zip(scored, trial):
      values = []
      for image_id in map(int, images):
        try:
          image = table.load(image_id)
        except BadImage as e:  # left out of this trial's mean, and named
          row["errors"].append(str(e))
          continue
        values.append(paper_iou.image_iou(grounder, image, row["label"],
                                          maps.get((image_id, row["latent"]), silent),
                                          acts.grid)[1])
      row["random_trials"].append(_finite(paper_iou.latent_iou(values)))
  for row in scored:
    trials = [v for v in row["random_trials"] if v is not None]
    row["random_iou"] = float(np.mean(trials)) if trials else None
  return rows


def read_labels(path: Path, latents: list[int]) -> tuple[dict[int, str], dict[int, str]]:
  """({latent: refined label}, {latent: why it has none}) from labels.jsonl of eval.models.refine (the
  last line of a latent wins)."""
  if not path.is_file():
    raise grounding.GroundingError(f"--labels={path}: no such file (labels.jsonl of "
                                   f"eval.clip_score --refine)")
  records = {}
  for line_no, record in jobs.read_jsonl(path):
    if not isinstance(record, dict) or not isinstance(record.get("latent"), int):
      raise grounding.GroundingError(f"--labels={path}:{line_no}: expected an object with a "
                                     "\"latent\"")
    records[record["latent"]] = record
  labels, missing = {}, {}
  for i in latents:
    record = records.get(i)
    if record and record.get("status") == prompts.OK and record.get("label"):
      labels[i] = record["label"]
    else:
      missing[i] = f"refine_{record.get('status')}" if record else "not_refined"
  return labels, missing


def main():
  out = Path(_OUT.value)
  paper = _METHOD.value == "paper"
  if paper and not (_LABELS.value and _SAE.value and _STORE.value):
    raise grounding.GroundingError("--method=paper needs --labels (refined labels), --store and "
                                   "--sae (the maps of the random images)")
  acts = topacts_lib.TopActs(_TOPACTS.value)
  records = jobs.read_explanations(Path(_EXPLANATIONS.value))
  explained = {i for i, r in records.items() if r["status"] == prompts.OK}
  latents, skipped = topacts_lib.selection_from_flags(acts, flags.FLAGS, restrict_to=explained)
  labels, unlabelled = read_labels(Path(_LABELS.value), latents) if paper else ({}, {})
  latents = [i for i in latents if i not in unlabelled]
  if not latents:
    raise grounding.GroundingError(f"--explanations={_EXPLANATIONS.value}: no latent with an ok "
                                   f"explanation{' and label' if paper else ''} and top images to "
                                   f"ground")
  device = _DEVICE.value
  if device is None:
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
  grounder = grounding.Grounder(_GROUNDING_DINO.value, _SAM.value, device, _BOX_THRESHOLD.value,
                                _TEXT_THRESHOLD.value)
  table = sources.open_table(acts, _STORE.value, _IMAGE_ROOT.value)
  if paper:
    rows = score_paper(acts, records, labels, latents, table, grounder, Store(_STORE.value),
                       SAE.from_export(_SAE.value, device=device))
  else:
    rows = score_patch(acts, records, latents, table, grounder)
  settings = {name: flags.FLAGS[name].value for name in (
      "method", "topacts", "explanations", "labels", "store", "sae", "grounding_dino", "sam",
      "base_view",
      "threshold", "box_threshold", "text_threshold", "shown", "random_draws", "seed", "bootstrap")}
  summary = {
      "format": FORMAT_NAME, "version": FORMAT_VERSION,
      "settings": {**settings, "device": device, "grid": list(acts.grid),
                   "covered": None if paper else iou_lib.COVERED,
                   "pixels": paper_iou.SIZE if paper else None},
      "latents": {"selected": len(latents), "scored": sum(r["iou"] is not None for r in rows),
                  "skipped_no_images": skipped, "skipped_no_label": len(unlabelled)},
      "images": dict(collections.Counter(
          "boxed" if image["boxes"] else "no box" for r in rows for image in r["images"])),
      "metrics": {name: stats.summarize([r[name] for r in rows], _BOOTSTRAP.value, _SEED.value)
                  for name in ("iou", "random_iou")}}
  out.mkdir(parents=True, exist_ok=True)
  atomic_write_bytes(out / "per_latent.jsonl",
                     "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode())
  atomic_write_json(out / "grounded_iou.json", summary)
  print(json.dumps({"ok": True, "method": _METHOD.value, **summary["latents"],
                    "iou": summary["metrics"]["iou"]["mean"],
                    "random_iou": summary["metrics"]["random_iou"]["mean"], "out": str(out)}))


if __name__ == "__main__":
  cli.run(main, (topacts_lib.TopActsError, StoreError, jobs.ResultsError,
                 grounding.GroundingError))
