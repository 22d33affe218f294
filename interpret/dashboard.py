"""`python -m interpret.dashboard`: a static HTML site to browse latents, their explanations and images.

  python -m interpret.dashboard --topacts=TOPACTS --explanations=EXPLANATIONS/explanations.jsonl \
      [--scores=SCORES.json] --out=SITE

SITE/index.html lists the latents (search by explanation, sort by density or any score) and
SITE/latents/<i>.html shows one latent: explanation, density, scores, activation histogram, and each
top image as is, as the paper's masked prompt and as a heatmap (PNGs in SITE/latents/<i>/). It needs
no server: open index.html in a browser, or copy the folder anywhere.

--concepts is eval.concepts's per_latent.jsonl (or its folder): each latent's best-matching planted
concept is shown beside its explanation, and its IoU and random baseline join the scores
(`concept_iou`, `concept_random_iou`). --headline is eval.report's headline.json: the ground-truth
claims (concepts found, named and steered) head the index, with the report's numbers.

A TOPACTS with a modality profile (docs/formats.md) adds each latent's modality, image and text
shares and both-score to its page (text_share and modality_both are sortable in the index), and its
top text contexts: --text_window tokens either side of the firing token (highlighted), decoded with
--tokenizer (default: the scanned store's model). Stores without text rows, or harvested before
records carried text tokens, get a note instead.

--scores is a JSON object {"<latent>": {"<score name>": number, ...}} (or {"<latent>": number},
read as the score "score"), or JSONL lines {"latent": i, "<score name>": number, ...}.
"""

from __future__ import annotations

import concurrent.futures as futures
import json
from pathlib import Path

from absl import flags
from tqdm import tqdm

from harvest.images import BadImage
from interpret import jobs, site, sources, textctx, visual
from interpret import topacts as topacts_lib
from sae_jax import cli
from sae_jax.store import StoreError
from sae_jax.files import atomic_write_bytes

_TOPACTS = flags.DEFINE_string("topacts", None, "TOPACTS folder (sae_jax.scan output).", required=True)
_EXPLANATIONS = flags.DEFINE_string("explanations", None, "explanations.jsonl of interpret.explain "
                                    "(or its folder; default: none, pages show images and "
                                    "statistics only).")
_SCORES = flags.DEFINE_string("scores", None, "Optional per-latent scores (JSON or JSONL).")
_CONCEPTS = flags.DEFINE_string("concepts", None, "per_latent.jsonl of eval.concepts (or its "
                                "folder): the planted concept each latent matches.")
_HEADLINE = flags.DEFINE_string("headline", None, "headline.json of eval.report: the ground-truth "
                                "claims, shown above the index.")
_OUT = flags.DEFINE_string("out", None, "Folder to write the site to.", required=True)
_STORE = flags.DEFINE_string("store", None, "Activation store whose image table names the images "
                             "(default: TOPACTS/images.jsonl).")
_IMAGE_ROOT = flags.DEFINE_string("image_root", None, "Folder relative image paths are relative to.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Side of the PNGs written.", lower_bound=16)
_NUM_IMAGES = flags.DEFINE_integer("num_images", None, "Top images per latent (default: all).",
                                   lower_bound=1)
_TITLE = flags.DEFINE_string("title", "SAE features", "Title of the site.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Tokenizer (path or hub id) that decodes the "
                                 "top text contexts (default: the scanned store's model).")
_NUM_TEXTS = flags.DEFINE_integer("num_texts", None, "Top text contexts per latent (default: "
                                  "all the scan kept).", lower_bound=1)
_TEXT_WINDOW = flags.DEFINE_integer("text_window", 8, "Tokens shown either side of a firing text "
                                    "token.", lower_bound=0)
_WORKERS = flags.DEFINE_integer("workers", 4, "Threads rendering pages and images.", lower_bound=1)
topacts_lib.define_selection_flags(flags)


class ScoresError(ValueError):
  """A --scores file that is not one of the accepted layouts."""


def _numbers(obj: dict) -> dict[str, float]:
  """The entries of `obj` that are numbers (true and false are no scores)."""
  return {k: float(v) for k, v in obj.items()
          if isinstance(v, (int, float)) and not isinstance(v, bool)}


def load_scores(path: str) -> dict[int, dict[str, float]]:
  layout = 'expected {"<latent>": {name: number}} or JSONL of {"latent": i, name: number}'
  if path.endswith(".jsonl"):
    scores = {}
    for line_no, row in jobs.read_jsonl(Path(path)):
      if not isinstance(row, dict) or type(row.get("latent")) is not int:
        raise ScoresError(f"--scores={path}:{line_no}: {layout}")
      scores[row["latent"]] = _numbers({k: v for k, v in row.items() if k != "latent"})
    return scores
  try:
    obj = json.loads(Path(path).read_bytes())
    return {int(k): {"score": float(v)} if isinstance(v, (int, float)) else _numbers(v)
            for k, v in obj.items()}
  except (TypeError, ValueError, AttributeError) as e:  # ValueError: not UTF-8, not JSON, ...
    raise ScoresError(f"--scores={path}: {layout} ({type(e).__name__}: {e})") from e


def load_concepts(path: str) -> dict[int, dict]:
  """{latent: {"concept", "iou", "random_iou"}} from eval.concepts's per_latent.jsonl."""
  file = Path(path) / "per_latent.jsonl" if Path(path).is_dir() else Path(path)
  concepts = {}
  for line_no, row in jobs.read_jsonl(file):
    if (not isinstance(row, dict) or type(row.get("latent")) is not int
        or not isinstance(row.get("concept"), (str, type(None)))):
      raise ScoresError(f"--concepts={file}:{line_no}: expected a row of eval.concepts "
                        '({"latent": i, "concept": name, "iou": number, ...})')
    concepts[row["latent"]] = {"concept": row["concept"], **_numbers(
        {"iou": row.get("iou"), "random_iou": row.get("random_iou")})}
  return concepts


def load_headline(path: str) -> list[dict]:
  """The rows of eval.report's headline.json (the ground-truth claims)."""
  try:
    rows = json.loads(Path(path).read_text())["rows"]
  except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
    raise ScoresError(f"--headline={path}: not a headline.json of eval.report ({e})") from e
  if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
    raise ScoresError(f"--headline={path}: \"rows\" is not a list of objects")
  return rows


def with_concepts(scores: dict[int, dict], concepts: dict[int, dict]) -> dict[int, dict]:
  """The scores plus each latent's concept IoU and its random baseline, sortable like any score."""
  out = {i: dict(v) for i, v in scores.items()}
  for i, match in concepts.items():
    out.setdefault(i, {}).update({f"concept_{k}": v for k, v in match.items() if k != "concept"})
  return out


def _render_latent(index, acts, table, record, scores, concept, neighbours, out: Path,
                   settings) -> None:
  latent = acts.latent(index)
  count = len(latent.image_ids) if settings["num_images"] is None else settings["num_images"]
  ids, maps, image_scores = latent.image_ids[:count], latent.maps[:count], latent.scores[:count]
  upper = float(maps.max(initial=0.0)) or 1.0  # shared by the latent's images: comparable colours
  folder = out / "latents" / str(index)
  folder.mkdir(parents=True, exist_ok=True)
  size = settings["image_size"]
  images = []
  for rank, (image_id, patch_map, score) in enumerate(zip(ids, maps, image_scores)):
    entry = {"id": int(image_id), "score": float(score), "files": None, "error": None, "source": ""}
    try:
      entry["source"] = table.record(int(image_id))["source"]
      image = table.load(int(image_id))
    except BadImage as e:
      entry["error"] = str(e)
      images.append(entry)
      continue
    view = table.record(int(image_id)).get("view", "squash")  # the base grid's part of the image
    pictures = {"original": visual.base_view(image, size, view),
                "mask": visual.dim_mask(image, patch_map, acts.grid, size, view),
                "heatmap": visual.heatmap(image, patch_map, acts.grid, upper, size, view=view)}
    entry["files"] = {}
    for kind, picture in pictures.items():
      atomic_write_bytes(folder / f"top{rank}_{kind}.png", visual.png_bytes(picture))
      entry["files"][kind] = f"{index}/top{rank}_{kind}.png"
    images.append(entry)
  text_html = ""
  if settings.get("text_note"):
    text_html = site.text_contexts_html(None, settings["text_note"])
  elif settings.get("tokenizer") is not None:
    found = textctx.contexts(acts, index, settings["records_by_id"], settings["tokenizer"],
                             settings.get("text_window", 8), settings.get("num_texts"))
    text_html = site.text_contexts_html(found, None if found is not None else textctx.NO_TOKENS_NOTE)
  profile = settings.get("modality")
  modality = ({name: profile[name][index] for name in profile} if profile else None)
  page = site.latent_page(latent, record, scores, images, acts.hist_edges, neighbours,
                          settings["title"], concept, modality, text_html)
  atomic_write_bytes(out / "latents" / f"{index}.html", page.encode())


def text_settings(acts, settings: dict) -> dict:
  """The modality profile, and the tokenizer (settings["tokenizer"]: an object with decode, or a
  path to load) or a note saying why there are no text contexts."""
  if acts.text is None:
    return {"modality": None, "text_note": None, "tokenizer": None}
  out = {"modality": acts.modality(), "text_note": None,
         "records_by_id": {r["id"]: r for r in acts.images()}}
  out["tokenizer"] = None
  if not acts.has_text():
    out["text_note"] = "The scanned store holds no text rows (harvested with --tokens=base_patches " \
                       "or image): no text contexts."
  elif not any("text_tokens" in r for r in out["records_by_id"].values()):
    out["text_note"] = textctx.NO_TOKENS_NOTE[0].upper() + textctx.NO_TOKENS_NOTE[1:] + "."
  else:
    tokenizer = settings.get("tokenizer")
    out["tokenizer"] = textctx.load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
  return out


def build_site(acts, table, latents: list[int], records: dict[int, dict],
               scores: dict[int, dict], out: Path, settings: dict,
               concepts: dict[int, dict] | None = None, headline: list[dict] | None = None) -> dict:
  concepts = concepts or {}
  scores = with_concepts(scores, concepts)
  settings = {**settings, **text_settings(acts, settings)}
  if settings["modality"]:  # sortable in the index like any score
    scores = {i: dict(v) for i, v in scores.items()}
    for i in latents:
      scores.setdefault(i, {}).update(
          text_share=float(settings["modality"]["text_share"][i]),
          modality_both=float(settings["modality"]["both"][i]))
  (out / "latents").mkdir(parents=True, exist_ok=True)
  atomic_write_bytes(out / "style.css", site.STYLE.encode())
  neighbours = {i: (latents[n - 1] if n else None, latents[n + 1] if n + 1 < len(latents) else None)
                for n, i in enumerate(latents)}
  with futures.ThreadPoolExecutor(settings["workers"]) as pool:
    jobs = [pool.submit(_render_latent, i, acts, table, records.get(i), scores.get(i, {}),
                        concepts.get(i), neighbours[i], out, settings) for i in latents]
    for job in tqdm(futures.as_completed(jobs), total=len(jobs), unit="latent", desc="dashboard"):
      job.result()
  score_names = sorted({name for i in latents for name in scores.get(i, {})})
  entries = [{"latent": i, "explanation": (records.get(i) or {}).get("explanation"),
              "status": (records.get(i) or {}).get("status", "not explained"),
              "concept": (concepts.get(i) or {}).get("concept"),
              "density": float(acts.density[i]), "scores": scores.get(i, {})} for i in latents]
  atomic_write_bytes(out / "index.html", site.index_page(entries, score_names, settings["title"],
                                                         show_concepts=bool(concepts),
                                                         headline=headline).encode())
  return {"latents": len(latents), "explained": sum(i in records for i in latents),
          "scored": sum(i in scores for i in latents), "score_names": score_names}


def main():
  out = Path(_OUT.value)
  acts = topacts_lib.TopActs(_TOPACTS.value)
  records = jobs.read_explanations(Path(_EXPLANATIONS.value)) if _EXPLANATIONS.value else {}
  scores = load_scores(_SCORES.value) if _SCORES.value else {}
  concepts = load_concepts(_CONCEPTS.value) if _CONCEPTS.value else {}
  headline = load_headline(_HEADLINE.value) if _HEADLINE.value else None
  latents, skipped = topacts_lib.selection_from_flags(
      acts, flags.FLAGS, restrict_to=set(records) if _EXPLANATIONS.value else None,
      with_text=acts.has_text())
  table = sources.open_table(acts, _STORE.value, _IMAGE_ROOT.value)
  summary = build_site(acts, table, latents, records, scores, out, {
      "image_size": _IMAGE_SIZE.value, "num_images": _NUM_IMAGES.value, "title": _TITLE.value,
      "workers": _WORKERS.value, "num_texts": _NUM_TEXTS.value,
      "text_window": _TEXT_WINDOW.value,
      "tokenizer": textctx.tokenizer_path(acts, _TOKENIZER.value) if acts.has_text() else None},
      concepts, headline)
  print(json.dumps({"ok": True, "skipped_no_images": skipped, **summary,
                    "index": str(out / "index.html")}))


if __name__ == "__main__":
  cli.run(main, (topacts_lib.TopActsError, StoreError, jobs.ResultsError, ScoresError, OSError,
                 textctx.TextContextError))
