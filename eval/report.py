"""`python -m eval.report`: one page (markdown and HTML) with a run's training, quality and scores.

  python -m eval.report --workdir=WORKDIR --clip_scores=SCORES [--sae_quality=QUALITY.json] \
      [--grounded_iou=GROUNDED_PAPER,GROUNDED_PATCH] [--concepts=CONCEPTS] [--steering=STEER] \
      [--topacts=TOPACTS] --out=REPORT

Any subset of the inputs works (--grounded_iou: eval.grounded_iou runs, e.g. --method=paper and
--method=patch, shown beside the CLIP score and, for method paper, the paper's IoU;
--concepts: eval.concepts's planted-concept IoU; --steering: eval.steer_concepts; with either, a
"Ground truth" section first, also written to REPORT/headline.json for interpret.dashboard
--headline; --topacts: how many latents fire on images only, text only or both, from sae_jax.scan's
modality profile). Writes REPORT/report.md, REPORT/report.html (open
it in a browser; it needs nothing else than the PNGs next to it), REPORT/training_curves.png (every
scalar of WORKDIR/metrics.jsonl against the step) and REPORT/score_distributions.png. --sae_quality
is the JSON summary of eval.sae_quality: every scalar in it is shown, nested keys joined with dots.
Model-generated text (explanations, labels) is escaped in both pages.
"""

from __future__ import annotations

import json
from pathlib import Path

from absl import flags
import numpy as np

from eval.metrics import ground_truth, scoring
from eval.reports import plots
from eval.reports.page import (Picture, ReportError, Section, Table, fmt, read_json, read_jsonl,
                        to_html, to_markdown)
from sae_jax import cli
from sae_jax.files import atomic_write_bytes, atomic_write_json

# The paper's CLIP scores (ViT-B/32 openai, LLaVA-NeXT-8B, 131k latents, top-5 images).
PAPER_CLIP_SCORES = (("layer 25 (model.layers.24, the released SAE)", 24.92),
                     ("layer 32", 26.55), ("random images", 18.2))
# The paper's IoU (GroundingDINO + SAM on refined labels vs the binarised activation maps, top-5
# images; its cross-layer table), and its random-images baseline.
PAPER_IOU = (("layer 25 (model.layers.24, the released SAE)", 0.31), ("layer 32", 0.40),
             ("random images", 0.005))
# Training metrics drawn first (when logged); every other scalar follows.
PREFERRED_CURVES = ("fvu", "loss", "dead_fraction", "tokens_per_s", "auxk_loss", "mse")
MAX_CURVES = 9
EXAMPLES = 10  # best and worst latents listed

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (metrics.jsonl, run.json).")
_CLIP_SCORES = flags.DEFINE_string("clip_scores", None, "Output folder of eval.clip_score (or its "
                                   "clip_scores.json).")
_SAE_QUALITY = flags.DEFINE_string("sae_quality", None, "JSON summary written by eval.sae_quality.")
_CONCEPTS = flags.DEFINE_string("concepts", None, "Output folder of eval.concepts (or its "
                                "concepts.json).")
_GROUNDED_IOU = flags.DEFINE_list("grounded_iou", [], "Output folders of eval.grounded_iou (or "
                                  "their grounded_iou.json), e.g. one per --method.")
_STEERING = flags.DEFINE_string("steering", None, "Output folder of eval.steer_concepts: whether "
                                "clamping a colour's latent makes the model say the colour.")
_TOPACTS = flags.DEFINE_string("topacts", None, "TOPACTS folder of sae_jax.scan: the latents' "
                               "modality counts (image only, text only, both).")
_OUT = flags.DEFINE_string("out", None, "Folder to write the report to.", required=True)
_TITLE = flags.DEFINE_string("title", "SAE run report", "Title of the report.")


def scalars(obj, prefix: str = "") -> list[tuple[str, object]]:
  """(dotted key, value) of every number, string or bool in nested dicts."""
  out = []
  for key, value in obj.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      out += scalars(value, f"{name}.")
    elif isinstance(value, (int, float, str, bool)):
      out.append((name, value))
  return out


def training_section(workdir: Path, out: Path) -> Section:
  metrics_path = workdir / "metrics.jsonl"
  if not metrics_path.exists():
    raise ReportError(f"--workdir={workdir}: no metrics.jsonl (not a sae_jax.train workdir?)")
  rows = read_jsonl(metrics_path, "workdir")
  blocks: list = [f"Workdir: {workdir}"]
  run_path = workdir / "run.json"
  if run_path.exists():
    run = read_json(run_path, "workdir")
    blocks.append(Table(["setting", "value"],
                        [[k, fmt(v)] for k, v in scalars({"sae": run.get("sae", {}),
                                                          "source": run.get("source", {})})]))
  if not rows:
    return Section("Training", blocks + ["metrics.jsonl is empty: no step was logged."])
  last = rows[-1]
  blocks.append(f"Last logged step: {last['step']}.")
  blocks.append(Table(["metric", "value at the last step"],
                      [[k, fmt(v)] for k, v in last.items() if k != "step"]))
  logged = [k for k in last if k != "step" and isinstance(last[k], (int, float))]
  keys = ([k for k in PREFERRED_CURVES if k in logged]
          + [k for k in logged if k not in PREFERRED_CURVES])[:MAX_CURVES]
  if keys:
    plots.training_curves(rows, keys, out / "training_curves.png")
    blocks.append(Picture("training_curves.png", "training curves"))
  return Section("Training", blocks)


def quality_section(path: Path) -> Section:
  quality = read_json(path, "sae_quality")
  if not isinstance(quality, dict):
    raise ReportError(f"--sae_quality={path}: expected a JSON object")
  table = Table(["metric", "value"], [[k, fmt(v)] for k, v in scalars(quality)])
  blocks = [f"From {path}.", table]
  if isinstance(quality.get("loss_recovered"), (int, float)):
    blocks.append(loss_recovered_note(quality))
  return Section("SAE quality", blocks)


def loss_recovered_note(quality: dict) -> str:
  """What loss_recovered says, and what a value outside [0, 1] means (readers take it for a bug)."""
  value = quality["loss_recovered"]
  note = ("loss_recovered = (L_zero - L_sae) / (L_zero - L_clean): 1 when splicing the SAE's "
          "reconstruction in costs nothing against the clean model, 0 when it is as bad as zeroing "
          "the hookpoint.")
  targets = quality.get("text_targets")
  kl = (quality.get("kl") or {}).get("sae")
  moved = f" KL(clean || sae) = {fmt(kl)} says how far the predictions moved." if kl else ""
  if value > 1:
    note += (f" Here it is {fmt(value)}, above 1: the model predicted the text slightly better "
             "with the reconstruction than with its own activations. That is no error: L_sae may "
             "fall below L_clean when the reconstruction drops directions the next-token loss does "
             "not use, and over few tokens" + (f" ({targets} text targets here)" if targets else "")
             + " the gap between the two is noise." + moved)
  elif value < 0:
    note += (f" Here it is {fmt(value)}, below 0: the reconstruction hurt the model more than "
             "zeroing the hookpoint, so the dictionary misses what later layers read." + moved)
  return note


def _clip_name(settings: dict) -> str:
  model = str(settings.get("clip_model"))
  # open_clip ignores --clip_pretrained for local-dir: and hf-hub: models.
  return model if model.startswith(("local-dir:", "hf-hub:")) else \
      f"{model} ({settings.get('clip_pretrained')})"


def clip_section(path: Path, out: Path) -> Section:
  folder = path.parent if path.is_file() else path
  summary = read_json(folder / "clip_scores.json", "clip_scores")
  rows = read_jsonl(folder / "per_latent.jsonl", "clip_scores")
  settings, latents = summary.get("settings", {}), summary.get("latents", {})
  excluded = ", ".join(f"{n} {why}" for why, n in latents.get("excluded", {}).items()) or "none"
  blocks: list = [
      f"CLIP model {_clip_name(settings)}; texts: "
      + (f"labels refined by {settings['refine']}" if settings.get("refine") else "explanations")
      + f". Latents scored: {latents.get('scored')} of {latents.get('selected')}; excluded: "
      f"{excluded}. Random baseline: {settings.get('random_draws')} draws per latent.",
      _metrics_table(_in_order(summary.get("metrics", {}))),
      "The paper (comparable only with --clip_model=ViT-B-32 --clip_pretrained=openai, the paper's "
      "SAE and explainer; see docs/reproduce_paper.md):",
      Table(["paper", "CLIP score"], [[name, value] for name, value in PAPER_CLIP_SCORES])]
  scored = [r for r in rows if r.get("clip_score") is not None]
  if scored:
    plots.score_distributions(scored, out / "score_distributions.png")
    blocks.append(Picture("score_distributions.png", "CLIP score distributions"))
    ranked = sorted(scored, key=lambda r: r["clip_score"], reverse=True)
    for title, chosen in ((f"Best {EXAMPLES} latents", ranked[:EXAMPLES]),
                          (f"Worst {EXAMPLES} latents", ranked[-EXAMPLES:][::-1])):
      blocks += [title + ":", Table(
          ["latent", "CLIP score", "random", "shuffled", "held-out AUROC", "explanation", "label"],
          [[r["latent"], fmt(r["clip_score"]), fmt(r.get("random_baseline")),
            fmt(r.get("shuffled_baseline")), fmt(r.get("heldout_auroc")),
            r.get("explanation") or "", r.get("label") or ""] for r in chosen])]
  return Section("CLIP score", blocks)


def _metrics_table(metrics: list[tuple[str, dict]]) -> Table:
  """One row per aggregate of eval.metrics.stats.summarize."""
  return Table(["metric", "latents", "mean", "median", "95% CI of the mean"],
               [[name, m["n"], fmt(m["mean"]), fmt(m["median"]),
                 "" if not m["ci95"] else f"[{fmt(m['ci95'][0])}, {fmt(m['ci95'][1])}]"]
                for name, m in metrics])


def concepts_section(path: Path) -> Section:
  """eval.concepts: the planted concepts the latents find, with the explanations beside them."""
  folder = path.parent if path.is_file() else path
  summary = read_json(folder / "concepts.json", "concepts")
  rows = read_jsonl(folder / "per_latent.jsonl", "concepts")
  settings, concepts = summary.get("settings", {}), summary.get("concepts", {})
  match_iou = settings.get("match_iou")
  blocks: list = [
      f"Each latent's top-image patch maps, binarised at activation > {settings.get('threshold')}, "
      f"against the masks of the shapes, colours and textures drawn in the synthetic images "
      f"({settings.get('concepts')}), compared on the {settings.get('grid')} patch grid (a patch is "
      f"in a mask when at least {settings.get('covered')} of it is). A latent's IoU is its mean "
      f"over its top images (latents with at least {settings.get('min_images')} of them), its "
      f"match the concept with the highest. Random baseline: the same maps with their active "
      f"patches placed at random ({settings.get('random_draws')} draws).",
      f"{summary.get('matched')} of {summary.get('planted')} planted concepts are matched by some "
      f"latent at IoU >= {match_iou} (by the randomly placed maps: "
      f"{summary.get('matched_random')}). Latents scored: {summary.get('latents', {}).get('scored')}.",
      _metrics_table(list(summary.get("metrics", {}).items())),
      Table(["planted concept", "best latent", "IoU", "random", f"matched (>= {match_iou})"],
            [[name, c.get("latent"), fmt(c.get("iou")), fmt(c.get("random_iou")),
              "yes" if c.get("matched") else "no"] for name, c in sorted(concepts.items())])]
  # Ranked by the gain over chance: a latent active everywhere matches a background as well at random.
  ranked = sorted((r for r in rows if r.get("iou") is not None),
                  key=lambda r: r["iou"] - (r.get("random_iou") or 0.0), reverse=True)
  if ranked:
    blocks += [f"Best {EXAMPLES} latents (by IoU minus the random placement's):", Table(
        ["latent", "planted concept", "IoU", "random", "explanation"],
        [[r["latent"], r.get("concept") or "", fmt(r["iou"]), fmt(r.get("random_iou")),
          r.get("explanation") or ""] for r in ranked[:EXAMPLES]])]
  return Section("Planted concepts (IoU)", blocks)


def modality_section(path: Path) -> Section:
  from sae_jax.formats import topacts as topacts_lib
  try:
    acts = topacts_lib.TopActs(path)
  except topacts_lib.TopActsError as e:
    raise ReportError(f"--topacts={path}: {e}") from e
  profile = acts.modality()
  if profile is None:
    return Section("Modality", [f"{path} was written by a scan without the modality profile: "
                                "rerun sae_jax.scan to count image, text and cross-modal latents."])
  blocks = [f"From {path}. Rows scanned per token kind: "
            + ", ".join(f"{k} {v}" for k, v in acts.header.get("rows_by_kind", {}).items()) + "."]
  if not acts.has_text():
    blocks.append("The scanned store holds no text rows (harvested with --tokens=base_patches or "
                  "image): every latent that fires is counted image-only; text is not measured.")
  counts = {name: int(np.sum(profile["modality"] == name)) for name in topacts_lib.MODALITIES}
  blocks.append(Table(["modality", "latents", "fraction"], [
      [label, counts[name], fmt(counts[name] / max(len(acts), 1))] for name, label in
      (("image", "image only"), ("text", "text only"), ("both", "both"), ("dead", "never fired"))]))
  blocks.append(f"A latent fires on both when min(image share, text share) / max(image share, text "
                f"share) >= {topacts_lib.BOTH_THRESHOLD}, where a share is the fraction of the "
                "latent's total activation (summed over every scanned token) on image or text "
                "tokens; otherwise it counts for the modality with the larger share.")
  return Section("Modality", blocks)


def _mean_ci(metric: dict | None) -> str:
  if not metric or metric.get("mean") is None:
    return ""
  ci = metric.get("ci95")
  return fmt(metric["mean"]) + (f" [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else "")


def _grounded_text(summary: dict) -> str:
  settings = summary.get("settings", {})
  counts = (f"Latents scored: {summary.get('latents', {}).get('scored')}; images: "
            + (", ".join(f"{n} {k}" for k, n in sorted(summary.get("images", {}).items())) or "none")
            + ".")
  models = (f"GroundingDINO ({settings.get('grounding_dino')}, box threshold "
            f"{settings.get('box_threshold')}) finds boxes in the top images the explainer saw, SAM "
            f"({settings.get('sam')}) segments them, and their union is compared with the latent's "
            f"map")
  if settings.get("method") == "paper":
    return (f"Method paper (the paper's computation): {models}, grounding the refined label in the "
            f"image squashed to {settings.get('pixels')} px (all of SAM's candidate masks); the map "
            f"is binarised at 1e-5 and upsampled bilinearly, a pixel counting where the mask is "
            f"below 224; pixel IoU, an image without a box counts 0. Random baseline: "
            f"{settings.get('random_draws')} trials of random images of the image set with the "
            f"latent's own maps there. " + counts)
  return (f"Method patch (ours): {models} binarised at activation > {settings.get('threshold')}, "
          f"on the {settings.get('grid')} patch grid, grounding the explanation itself (text "
          f"threshold {settings.get('text_threshold')}). Random baseline: the same maps with their "
          f"active patches placed at random. " + counts)


def grounded_section(paths: list[Path], clip_path: Path | None) -> Section:
  """eval.grounded_iou, one run per method, and next to it the CLIP score of the same run."""
  runs = []
  for path in paths:
    folder = path.parent if path.is_file() else path
    summary = read_json(folder / "grounded_iou.json", "grounded_iou")
    runs.append((summary.get("settings", {}).get("method", "patch"), summary))
  blocks: list = []
  for method, summary in runs:
    blocks += [_grounded_text(summary), _metrics_table(list(summary.get("metrics", {}).items()))]
  clip = {}
  if clip_path is not None:
    clip_folder = clip_path.parent if clip_path.is_file() else clip_path
    clip = read_json(clip_folder / "clip_scores.json", "clip_scores").get("metrics", {})
  paper, paper_iou = dict(PAPER_CLIP_SCORES), dict(PAPER_IOU)
  layer25 = "layer 25 (model.layers.24, the released SAE)"
  rows = [["CLIP score", _mean_ci(clip.get("clip_score")), _mean_ci(clip.get("random_baseline")),
           paper[layer25], paper["random images"]]]
  for method, summary in runs:
    metrics = summary.get("metrics", {})
    same = method == "paper"  # the paper's IoUs are numbers of its own method only
    rows.append([f"IoU, method {method}", _mean_ci(metrics.get("iou")),
                 _mean_ci(metrics.get("random_iou")), paper_iou[layer25] if same else "",
                 paper_iou["random images"] if same else ""])
  blocks += ["CLIP and IoU side by side (mean over latents [95% CI]). The paper's IoU 0.31 and "
             "random 0.005 are numbers of method paper (its pixel IoU with random images as "
             "baseline); method patch is not comparable with them.",
             Table(["metric", "this run", "random baseline", "the paper", "the paper's random"],
                   rows)]
  return Section("IoU (GroundingDINO + SAM)", blocks)


def _in_order(metrics: dict) -> list[tuple[str, dict]]:
  """The metrics in scoring.METRIC_NAMES order (JSON files keep them sorted by name)."""
  known = [(name, metrics[name]) for name in scoring.METRIC_NAMES if name in metrics]
  return known + [(name, m) for name, m in metrics.items() if name not in scoring.METRIC_NAMES]


def ground_truth_section(headline: list[dict]) -> Section:
  return Section("Ground truth", [
      "What the pipeline found, named and steered, checked against what harvest.images drew "
      "(eval.metrics.ground_truth; the same table heads the dashboard).",
      Table(["claim", "this run", "baseline", "target"],
            [[r["claim"], r["reached"], r["baseline"], r["target"]] for r in headline])])


def main():
  if not (_WORKDIR.value or _CLIP_SCORES.value or _SAE_QUALITY.value or _CONCEPTS.value
          or _GROUNDED_IOU.value or _TOPACTS.value or _STEERING.value):
    raise ReportError("nothing to report: pass --workdir, --clip_scores, --sae_quality, "
                      "--concepts, --grounded_iou, --steering and/or --topacts")
  out = Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  sections = []
  headline = []
  if _CONCEPTS.value or _STEERING.value:  # ground truth: planted concepts, steered colours
    optional = lambda flag: Path(flag.value) if flag.value else None
    headline = ground_truth.rows(optional(_CONCEPTS), optional(_CLIP_SCORES), optional(_STEERING))
    sections.append(ground_truth_section(headline))
  if _WORKDIR.value:
    sections.append(training_section(Path(_WORKDIR.value), out))
  if _SAE_QUALITY.value:
    sections.append(quality_section(Path(_SAE_QUALITY.value)))
  if _CLIP_SCORES.value:
    sections.append(clip_section(Path(_CLIP_SCORES.value), out))
  if _GROUNDED_IOU.value:
    sections.append(grounded_section([Path(p) for p in _GROUNDED_IOU.value],
                                     Path(_CLIP_SCORES.value) if _CLIP_SCORES.value else None))
  if _CONCEPTS.value:
    sections.append(concepts_section(Path(_CONCEPTS.value)))
  if _TOPACTS.value:
    sections.append(modality_section(Path(_TOPACTS.value)))
  if headline:
    atomic_write_json(out / ground_truth.HEADLINE_FILE, {"rows": headline})
  atomic_write_bytes(out / "report.md", to_markdown(_TITLE.value, sections).encode())
  atomic_write_bytes(out / "report.html", to_html(_TITLE.value, sections).encode())
  print(json.dumps({"ok": True, "sections": [s.title for s in sections],
                    "markdown": str(out / "report.md"), "html": str(out / "report.html")}))


if __name__ == "__main__":
  cli.run(main, (ReportError,))
