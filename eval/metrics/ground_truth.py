"""The miniature world's claims against its ground truth (eval.world), in one table.

`explanation_accuracy()` (used by eval.concepts) counts the matched latents whose explanation
names their concept.

`rows()` reads the outputs of eval.concepts (concept recovery, explanation accuracy),
eval.clip_score and eval.steer_concepts and returns one row per claim: what the run reached, its
baseline and the claim's target. eval.report shows the rows and writes them to
REPORT/headline.json, which interpret.dashboard --headline shows above its index: both pages
show the same numbers because they come from this one function.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from eval.metrics import scoring
from eval.reports.page import fmt, read_json

HEADLINE_FILE = "headline.json"
# The world's targets (issue 24): what a pipeline that works must reach on it.
TARGETS = {"concepts": "matched >= 80%, random placement <= 10%",
           "explanations": ">= 70% name their concept",
           "clip": "95% CI of the difference above 0",
           "steering": "colour latent >= 50%, random latent <= 5%"}


def names_concept(explanation: str | None, concept: str) -> bool:
  """Whether an explanation says a concept's name ("colour:red" -> the word "red")."""
  words = re.findall(r"[a-z]+", (explanation or "").lower())
  return concept.split(":", 1)[1] in words


def explanation_accuracy(rows: list[dict], match_iou: float, draws: int, seed: int) -> dict:
  """Of the latents that match a concept at `match_iou`, the share whose explanation names it,
  and the same share with the explanations shuffled among them (mean over `draws` derangements):
  the rate a name lands on its concept by chance."""
  matched = [r for r in rows if r["iou"] is not None and r["iou"] >= match_iou]
  named = [names_concept(r["explanation"], r["concept"]) for r in matched]
  shuffled = []
  rng = np.random.default_rng(seed)
  for _ in range(draws if len(matched) > 1 else 0):
    order = scoring.derangement(len(matched), int(rng.integers(2**31)))
    shuffled.append(np.mean([names_concept(matched[j]["explanation"], r["concept"])
                             for r, j in zip(matched, order)]))
  return {"matched_latents": len(matched),
          "explained": sum(r["explanation"] is not None for r in matched),
          "named": int(sum(named)), "accuracy": float(np.mean(named)) if named else None,
          "shuffled_accuracy": float(np.mean(shuffled)) if shuffled else None,
          "shuffle_draws": len(shuffled)}


def _share(part, whole) -> str:
  return f"{part}/{whole} ({fmt(part / whole if whole else None)})"


def _interval(ci) -> str:
  return f"[{fmt(ci[0])}, {fmt(ci[1])}]" if ci else ""


def _folder(path: Path) -> Path:
  return path.parent if path.is_file() else path


def rows(concepts: Path | None = None, clip_scores: Path | None = None,
         steering: Path | None = None) -> list[dict]:
  """{"claim", "reached", "baseline", "target"} per claim whose output is given."""
  out = []
  if concepts is not None:
    summary = read_json(_folder(concepts) / "concepts.json", "concepts")
    match_iou = summary.get("settings", {}).get("match_iou")
    out.append({"claim": f"planted concepts matched by a latent at IoU >= {match_iou}",
                "reached": _share(summary["matched"], summary["planted"]),
                "baseline": "random placement " + _share(summary["matched_random"],
                                                          summary["planted"]),
                "target": TARGETS["concepts"]})
    explained = summary.get("explanations")
    if explained:
      out.append({"claim": "explanations of matched latents that name their concept",
                  "reached": _share(explained["named"], explained["matched_latents"]),
                  "baseline": f"shuffled {fmt(explained['shuffled_accuracy'])}",
                  "target": TARGETS["explanations"]})
  if clip_scores is not None:
    metrics = read_json(_folder(clip_scores) / "clip_scores.json", "clip_scores")["metrics"]
    diff = metrics.get("score_minus_shuffled") or {}
    out.append({"claim": "CLIP score minus the shuffled baseline (mean [95% CI])",
                "reached": f"{fmt(diff.get('mean'))} {_interval(diff.get('ci95'))}",
                "baseline": f"CLIP score {fmt(metrics['clip_score']['mean'])}, shuffled "
                            f"{fmt(metrics['shuffled_baseline']['mean'])}",
                "target": TARGETS["clip"]})
  if steering is not None:
    summary = read_json(_folder(steering) / "steer_concepts.json", "steering")
    out.append({"claim": "captions that name a colour after its latent is clamped (images "
                         "without it)",
                "reached": f"{fmt(summary['changed_rate'])} {_interval(summary['changed_ci'])} "
                           f"of {summary['trials']}",
                "baseline": f"random latents ({summary['settings'].get('random_latents', 1)} "
                            f"per colour) {fmt(summary['random_rate'])} "
                            f"{_interval(summary['random_ci'])}",
                "target": TARGETS["steering"]})
  return out
