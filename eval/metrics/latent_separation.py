"""Which SAE latents separate hallucinated from correct answers, and how steering them changes
accuracy: the pieces of `python -m eval.hallucination_latents` that need no flags."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from eval.metrics import stats

PLACES = ("last_prompt", "answer", "image")
ERRORS = ("false_yes", "false_no", "wrong")
from harvest import llava
from harvest.hooks import StopForward
from interpret import steering


def group_keys(task_name: str, items: list) -> list[str]:
  """The image of each item, the unit the split and the bootstrap resample: POPE's image file,
  HallusionBench's figure (category, subcategory, set_id, figure_id)."""
  if task_name == "pope":
    return [str(item.image) for item in items]
  return ["/".join(item.field(k) for k in ("category", "subcategory", "set_id", "figure_id"))
          for item in items]


def split_items(groups: list[str], share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(discovery, held-out) item indices, each sorted, whole groups (images) on one side: a seeded
  permutation of the distinct groups cut at share * their number."""
  names, owner = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
  order = np.random.default_rng(seed).permutation(len(names))
  found = np.isin(owner, order[:int(round(share * len(names)))])
  return np.flatnonzero(found), np.flatnonzero(~found)


def cluster_resamples(groups: list[str], resamples: int, seed: int) -> list[np.ndarray]:
  """Item indices of each cluster-bootstrap resample: the groups drawn with replacement, each
  bringing all its items (items of one image are not independent)."""
  names, owner = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
  members = [np.flatnonzero(owner == g) for g in range(len(names))]
  rng = np.random.default_rng(seed)
  return [np.concatenate([members[g] for g in rng.integers(0, len(names), len(names))])
          for _ in range(resamples)]


def auroc_with_ci(scores: np.ndarray, labels: np.ndarray, groups: list[str], resamples: int,
                  seed: int) -> dict:
  """{"auroc", "ci95"} of scores [items] for labels 1 against 0 (NaN: not in the contrast), the
  interval a cluster bootstrap by group (resamples lacking a class are skipped); None where the
  items lack a class."""
  keep = np.isfinite(labels) & np.isfinite(scores)
  scores, labels = scores[keep], labels[keep].astype(bool)
  groups = list(np.asarray(groups, dtype=object)[keep])
  if labels.all() or not labels.any():
    return {"auroc": None, "ci95": None}
  values = [stats.auroc(scores[i][labels[i]], scores[i][~labels[i]])
            for i in cluster_resamples(groups, resamples, seed) if 0 < labels[i].sum() < len(i)]
  return {"auroc": stats.auroc(scores[labels], scores[~labels]),
          "ci95": [float(v) for v in np.percentile(values, [2.5, 97.5])] if values else None}


def latent_aurocs(activations: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """AUROC per latent (column) of rows labelled 1 against rows labelled 0; rows with a NaN label
  (not in the contrast) or a NaN activation (no image) are left out; a latent that never fires has
  NaN (no evidence either way, ranked last)."""
  labels = np.asarray(labels, np.float64)
  keep = ~np.isnan(activations).any(axis=1) & np.isfinite(labels)
  activations, positive = activations[keep], labels[keep].astype(bool)
  out = np.full(activations.shape[1], np.nan)
  if positive.all() or not positive.any():
    return out
  for latent in np.flatnonzero((activations != 0).any(axis=0)):
    column = activations[:, latent]
    out[latent] = stats.auroc(column[positive], column[~positive])
  return out


def top_latents(aurocs: np.ndarray, top: int, direction: str) -> list[int]:
  """The `top` latents by AUROC, highest first (hallucinated) or lowest first (correct); NaN
  (never fired) last either way."""
  order = np.argsort(-aurocs if direction == "hallucinated" else aurocs, kind="stable")
  return [int(f) for f in order[:top]]


def dense_means(sae, rows: torch.Tensor, owners: torch.Tensor, count: int) -> torch.Tensor:
  """[count, num_latents]: the mean TopK activation vector of the rows owned by each of `count`
  items (rows [r, d], owners [r]); an item without rows gets NaN."""
  total = torch.zeros(count, sae.num_latents, device=rows.device)
  for chunk, owner in zip(rows.split(steering.CHUNK_ROWS), owners.split(steering.CHUNK_ROWS)):
    values, indices = sae.encode(chunk.float())
    total.index_put_((owner[:, None].expand_as(indices), indices), values, accumulate=True)
  return total / torch.bincount(owners, minlength=count)[:, None]


@torch.no_grad()
def answer_and_record(loaded: llava.LoadedModel, sae, layer: int, texts: list[str],
                      batch_images: list | None,
                      max_new_tokens: int) -> tuple[list[str], dict[str, torch.Tensor]]:
  """Greedy answers of a batch, and the latent activations [batch, latents] at each of PLACES from
  one forward pass over the prompt and the first generated token, as the model produced it:
  last_prompt (the last prompt position, whose state decides the answer's first token), answer
  (that generated token: it already encodes the answer given) and image (the mean over the image
  tokens; NaN without an image)."""
  inputs, out = steering.generate_ids(loaded, batch_images, texts, max_new_tokens)
  length = inputs["input_ids"].shape[1]
  answers = loaded.processor.tokenizer.batch_decode(out[:, length:], skip_special_tokens=True)
  mask = inputs["attention_mask"]
  forced = {**inputs, "input_ids": out[:, :length + 1],
            "attention_mask": torch.cat([mask, torch.ones_like(mask[:, :1])], 1)}
  recorded = []

  def record(hidden: torch.Tensor, offset: int) -> None:
    recorded.append(hidden)
    raise StopForward()  # the layers above the hookpoint are not needed

  with steering.BlockEdit(loaded.model, layer, record), contextlib.suppress(StopForward):
    loaded.model.model(**forced, use_cache=False)  # the base model: no logits over the vocabulary
  hidden = recorded[0]
  batch = len(texts)
  rows = torch.arange(batch, device=hidden.device)
  image = (inputs["input_ids"] == loaded.layout.image_token_id) & mask.bool()
  owners = rows[:, None].expand_as(image)[image]
  # Left padding: every prompt ends at position length - 1.
  return answers, {"last_prompt": dense_means(sae, hidden[:, length - 1], rows, batch),
                   "answer": dense_means(sae, hidden[:, length], rows, batch),
                   "image": dense_means(sae, hidden[:, :length][image], owners, batch)}


def per_item(task_name: str, records: list[dict]) -> dict[str, np.ndarray]:
  """Per-answer arrays the bootstrap resamples: correct, truth (the right answer is yes), and for
  POPE predicted yes."""
  if task_name == "pope":
    predicted = np.array([r["parsed"] == "yes" for r in records])
    truth = np.array([r["label"] == "yes" for r in records])
    return {"correct": predicted == truth, "predicted": predicted, "truth": truth}
  return {"correct": np.array([bool(r["correct"]) for r in records]),
          "truth": np.array([str(r.get("gt_answer")) == "1" for r in records])}


def resampled_metrics(arrays: dict[str, np.ndarray], indices: np.ndarray) -> dict[str, np.ndarray]:
  """accuracy, false_yes_rate (wrong among the items whose answer is no: object hallucination),
  false_no_rate (wrong among those whose answer is yes), and for POPE F1 ("yes" positive, 0
  without positives), of each row of indices [resamples, n]."""
  correct, truth = arrays["correct"][indices], arrays["truth"][indices]
  rate = lambda wrong, among: np.divide(wrong.sum(-1), among.sum(-1), out=np.full(len(wrong),
                                        np.nan), where=among.sum(-1) > 0)
  out = {"accuracy": correct.mean(-1), "false_yes_rate": rate(~correct & ~truth, ~truth),
         "false_no_rate": rate(~correct & truth, truth)}
  if "predicted" in arrays:
    predicted = arrays["predicted"][indices]
    tp = (predicted & truth).sum(-1)
    wrong = (predicted != truth).sum(-1)
    out["f1"] = np.divide(2 * tp, 2 * tp + wrong, out=np.zeros(len(tp)), where=2 * tp + wrong > 0)
  return out


def compare(plain: dict[str, np.ndarray], steered: dict[str, np.ndarray], groups: list[str],
            resamples: int, seed: int) -> dict:
  """Each metric's change steered - plain, with its paired cluster-bootstrap 95% interval: every
  resample draws images (groups) with replacement and takes the same items for both arms."""
  everything = np.arange(len(plain["correct"]))[None]
  samples = cluster_resamples(groups, resamples, seed)
  out = {}
  for name in resampled_metrics(plain, everything):
    delta = lambda idx: (resampled_metrics(steered, idx[None])[name][0] -
                         resampled_metrics(plain, idx[None])[name][0])
    deltas = np.array([delta(idx) for idx in samples])
    finite = deltas[np.isfinite(deltas)]
    value = lambda arrays: float(resampled_metrics(arrays, everything)[name][0])
    out[name] = {"plain": value(plain), "steered": value(steered),
                 "delta": float(delta(everything[0])),
                 "ci95": [float(v) for v in np.percentile(finite, [2.5, 97.5])] if len(finite)
                 else None}
  return out


def error_labels(task_name: str, records: list[dict]) -> dict[str, np.ndarray]:
  """Per error kind, [items] float: 1 for the error, 0 for its correct counterpart, NaN for items
  outside the contrast. false_yes: a wrong answer where the truth is no (object hallucination)
  against the right answers there; false_no: the same where the truth is yes; wrong: every wrong
  answer against every right one (mixes both)."""
  arrays = per_item(task_name, records)
  wrong, truth = (~arrays["correct"]).astype(np.float64), arrays["truth"]
  return {"false_yes": np.where(~truth, wrong, np.nan), "false_no": np.where(truth, wrong, np.nan),
          "wrong": wrong}
