"""`python -m eval.clip_score`: CLIP-score explanations against their latents' top images.

  python -m eval.clip_score --topacts=TOPACTS --explanations=EXPLANATIONS/explanations.jsonl \
      --clip_model=ViT-B-32 --clip_pretrained=openai --out=SCORES
  python -m eval.clip_score ... --clip_model=local-dir:/models/tiny_clip     (eval.tiny_clip)
  python -m eval.clip_score ... --refine=openai:http://localhost:8001/v1 \
      --refine_model=meta-llama/Llama-3.1-8B-Instruct                          (the paper's labels)

Per latent (see eval/metrics/scoring.py): the paper's CLIP score of the explanation (or its refined label)
against the top images shown to the explainer, the same text against random images (30 draws),
the shown images against another latent's text (shuffled), and the AUROC of the unshown top images
against non-top images. Latents whose explanation is unable/parse_error/failed (or whose refinement
failed) are excluded and counted. Writes to --out:
  clip_scores.json           settings, counts and every aggregate: n, mean, median, bootstrap 95% CI
  per_latent.jsonl           one row per selected latent (also a --scores file of interpret.dashboard)
  score_distributions.png    histograms of the scores against the baselines, and of the AUROC
  labels.jsonl, refine_cache/  with --refine (resumable: rerun to retry failed latents)
  embedding_cache/           image embeddings (default place of --embedding_cache)
Exit status: 0 done, 1 bad input, 2 some refinements failed (rerun to retry them).
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

import numpy as np
from absl import flags

from eval.metrics import scoring, stats
from eval.models import clip as clip_lib
from eval.models import refine
from eval.reports import plots
from harvest.images import BadImage
from interpret import explainers, jobs, llm_flags, prompts, sources
from interpret import topacts as topacts_lib
from sae_jax import cli
from sae_jax.store import StoreError
from sae_jax.files import atomic_write_bytes, atomic_write_json

FORMAT_NAME, FORMAT_VERSION = "clip-scores", 1

_BEFORE = set(flags.FLAGS)

_TOPACTS = flags.DEFINE_string("topacts", None, "TOPACTS folder (sae_jax.scan output).", required=True)
_EXPLANATIONS = flags.DEFINE_string("explanations", None, "explanations.jsonl of interpret.explain "
                                    "(or its folder).", required=True)
_OUT = flags.DEFINE_string("out", None, "Output folder (see the module doc).", required=True)
_STORE = flags.DEFINE_string("store", None, "Activation store whose image table names the images "
                             "(default: TOPACTS/images.jsonl).")
_IMAGE_ROOT = flags.DEFINE_string("image_root", None, "Folder relative image paths are relative to.")
_CLIP_MODEL = flags.DEFINE_string("clip_model", "ViT-B-32", "open_clip architecture (ViT-B-32 is "
                                  "the paper's), or local-dir:PATH / hf-hub:ORG/REPO.")
_CLIP_PRETRAINED = flags.DEFINE_string("clip_pretrained", "openai", "open_clip pretrained tag or "
                                       "weights file (ignored for local-dir: and hf-hub: models).")
_DEVICE = flags.DEFINE_string("device", None, "Torch device (default: cuda when available, else "
                              "cpu). Also runs an hf: --refine model.")
_PRECISION = flags.DEFINE_enum("precision", "fp32", list(clip_lib.PRECISIONS), "CLIP precision.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Images (or texts) per CLIP forward pass.",
                                   lower_bound=1)
_WORKERS = flags.DEFINE_integer("workers", 8, "Threads decoding images.", lower_bound=1)
_EMBEDDING_CACHE = flags.DEFINE_string("embedding_cache", None, "Folder of cached image embeddings, "
                                       "shareable between runs (default: OUT/embedding_cache).")
_SHOWN = flags.DEFINE_integer("shown", 5, "Top images the explainer saw, for explanations that do "
                              "not list them (interpret.explain records them in 'images').",
                              lower_bound=1)
_RANDOM_DRAWS = flags.DEFINE_integer("random_draws", 30, "Draws of random images per latent for "
                                     "the random baseline, each as many as the shown images (the "
                                     "paper: 30 x 5).", lower_bound=0)
_HELDOUT_NEGATIVES = flags.DEFINE_integer("heldout_negatives", 100, "Random non-top images per "
                                          "latent for the held-out AUROC.", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random images, the shuffle and the bootstrap.")
_BOOTSTRAP = flags.DEFINE_integer("bootstrap", 1000, "Bootstrap resamples of the latents for the "
                                  "95% intervals (0: none).", lower_bound=0)
_REFINE = llm_flags.define_endpoint(
    "refine", "Rewrite each explanation into a short label before scoring, with openai:URL or "
    "hf:PATH (as interpret.explain's --explainer). Default: score the explanations as they are.")
_REQUESTS = llm_flags.define_requests("refinement", timeout_s=120.0, max_tokens=64)
flags.adopt_module_key_flags(llm_flags)  # so that --help lists them as this command's
_REFINE_TEMPLATE = flags.DEFINE_string("refine_template", None, "Refinement prompt template "
                                       "(default: eval/templates/refine_label.txt), or paper:CLONE "
                                       "for the paper's prompt read from a clone of "
                                       "EvolvingLMMs-Lab/multimodal-sae.")

topacts_lib.define_selection_flags(flags)
_OURS = sorted(set(flags.FLAGS) - _BEFORE)


class InputError(ValueError):
  """Inputs that do not fit together (explanations of another TOPACTS, nothing to score)."""


def read_explanations(path: Path, acts: topacts_lib.TopActs) -> dict[int, dict]:
  records = jobs.read_explanations(path)
  outside = sorted(i for i in records if not 0 <= i < len(acts))
  if outside:
    raise InputError(f"--explanations={path} names latents {outside[:5]} but --topacts="
                     f"{acts.path} has latents 0..{len(acts) - 1}: explanations of another TOPACTS?")
  return records


def device() -> str:
  if _DEVICE.value:
    return _DEVICE.value
  import torch
  return "cuda" if torch.cuda.is_available() else "cpu"


def refine_labels(texts: dict[int, str], out: Path) -> tuple[dict[int, str], dict[int, str], dict]:
  """({latent: label}, {latent: why it has none}, summary) for the latents of `texts`."""
  client = _REFINE.client(timeout_s=_REQUESTS.timeout_s.value,
                          max_tokens=_REQUESTS.max_tokens.value, device=device())
  template = refine.load_template(_REFINE_TEMPLATE.value)
  settings = jobs.JobSettings(concurrency=_REQUESTS.concurrency.value, max_retries=_REQUESTS.max_retries.value)
  records, summary = refine.refine(texts, template, client, out, settings)
  labels, failures = {}, {}
  for i in texts:
    status = records[i]["status"] if i in records else prompts.FAILED
    if status == prompts.OK:
      labels[i] = records[i]["label"]
    else:
      failures[i] = f"refine_{status}"
  return labels, failures, {"model": client.name, **summary}


def texts_to_score(records, latents, out: Path):
  """({latent: explanation}, {latent: label}, {latent: why it is excluded}, refinement summary)."""
  excluded = {i: records[i]["status"] for i in latents if records[i]["status"] != prompts.OK}
  explanations = {i: records[i]["explanation"] for i in latents if i not in excluded}
  if not _REFINE.spec.value:
    return explanations, {}, excluded, None
  labels, failures, summary = refine_labels(explanations, out)
  return explanations, labels, {**excluded, **failures}, summary


def score(acts, records, latents, clip: clip_lib.Clip, out: Path) -> tuple[list[dict], dict]:
  """Per-latent rows (scored and excluded) and the summary of the run."""
  texts, labels, excluded, refine_summary = texts_to_score(records, latents, out)
  scored = [i for i in latents if i not in excluded]
  if not scored:
    raise InputError(f"no latent to score: {len(latents)} selected, excluded: "
                     f"{dict(collections.Counter(excluded.values()))}")

  pool = np.asarray(sorted(int(r["id"]) for r in acts.images()), np.int64)
  plans = []
  for i in scored:
    top = acts.latent(i).image_ids
    shown = np.asarray(records[i].get("images") or top[:_SHOWN.value], np.int64)
    plans.append(scoring.plan(i, top, shown, pool, _RANDOM_DRAWS.value, _HELDOUT_NEGATIVES.value,
                              _SEED.value))
  image_ids = np.unique(np.concatenate([p.all_ids() for p in plans]))

  cache = clip_lib.EmbeddingCache(_EMBEDDING_CACHE.value or out / "embedding_cache", clip.identity)
  table = sources.open_table(acts, _STORE.value, _IMAGE_ROOT.value)
  image_embeddings, image_stats = clip_lib.embed_images(
      clip, table.load, image_ids.tolist(), cache, _BATCH_SIZE.value, _WORKERS.value)
  text_embeddings = clip_lib.embed_texts(clip, [labels.get(i, texts[i]) for i in scored],
                                         _BATCH_SIZE.value)
  scores = scoring.score_latents(plans, text_embeddings, image_ids, image_embeddings, _SEED.value)

  rows = [{"explanation": texts[s["latent"]], "label": labels.get(s["latent"]), "excluded": None,
           **s} for s in scores]
  rows += [{"latent": i, "explanation": records[i].get("explanation"), "label": None,
            "excluded": why, **dict.fromkeys(scoring.SCORE_NAMES)} for i, why in excluded.items()]
  summary = {"latents": {"selected": len(latents), "scored": len(scored),
                         "excluded": dict(sorted(collections.Counter(excluded.values()).items())),
                         "with_heldout": sum(s["heldout_auroc"] is not None for s in scores)},
             "metrics": aggregate(scores), "images": {"pool": len(pool), **image_stats},
             "clip_identity": clip.identity, "refine": refine_summary}
  return sorted(rows, key=lambda r: r["latent"]), summary


def aggregate(scores: list[dict]) -> dict:
  """Every metric over the scored latents (scoring.METRIC_NAMES)."""
  columns = {name: [s[name] for s in scores] for name in scoring.SCORE_NAMES}
  for name, baseline in scoring.DIFFERENCES.items():
    columns[name] = [None if s[baseline] is None else s["clip_score"] - s[baseline] for s in scores]
  return {name: stats.summarize(columns[name], _BOOTSTRAP.value, _SEED.value)
          for name in scoring.METRIC_NAMES}


def main():
  out = Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  settings = {name: flags.FLAGS[name].value for name in _OURS}  # the key itself is never a flag
  atomic_write_json(out / "flags.json", settings)
  acts = topacts_lib.TopActs(_TOPACTS.value)
  records = read_explanations(Path(_EXPLANATIONS.value), acts)
  latents, skipped = topacts_lib.selection_from_flags(acts, flags.FLAGS, restrict_to=set(records))
  # Before any refinement request: a CLIP model that cannot load fails the run at once.
  clip = clip_lib.load(_CLIP_MODEL.value, _CLIP_PRETRAINED.value, device(), _PRECISION.value)
  rows, summary = score(acts, records, latents, clip, out)
  atomic_write_json(out / "clip_scores.json", {"format": FORMAT_NAME, "version": FORMAT_VERSION,
                                               "settings": settings, "skipped_no_images": skipped,
                                               **summary})
  atomic_write_bytes(out / "per_latent.jsonl",
                     "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode())
  plots.score_distributions([r for r in rows if r["excluded"] is None],
                            out / "score_distributions.png")
  failed = summary["latents"]["excluded"].get(f"refine_{prompts.FAILED}", 0)
  means = {name: summary["metrics"][name]["mean"] for name in scoring.SCORE_NAMES}
  print(json.dumps({"ok": not failed, **summary["latents"], **means, "out": str(out)}))
  sys.exit(2 if failed else 0)


if __name__ == "__main__":
  cli.run(main, (topacts_lib.TopActsError, StoreError, jobs.ResultsError, prompts.TemplateError,
                 explainers.ExplainerError, clip_lib.ClipError, BadImage, InputError))
