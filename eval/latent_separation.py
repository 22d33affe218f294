"""Which SAE latents separate hallucinated from correct answers, and how steering them changes
accuracy: the pieces of `python -m eval.hallucination_latents` that need no flags."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from eval import stats
from harvest import llava
from harvest.hooks import StopForward
from interpret import steering


def split_items(n: int, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(discovery, held-out) item indices, each sorted: a seeded permutation cut at share * n."""
  order = np.random.default_rng(seed).permutation(n)
  cut = int(round(share * n))
  return np.sort(order[:cut]), np.sort(order[cut:])


def latent_aurocs(activations: np.ndarray, hallucinated: np.ndarray) -> np.ndarray:
  """AUROC per latent (column) of hallucinated rows against correct ones; rows with a NaN (no
  image) are left out; a latent that never fires has NaN (no evidence either way, ranked last)."""
  keep = ~np.isnan(activations).any(axis=1)
  activations, hallucinated = activations[keep], hallucinated[keep]
  out = np.full(activations.shape[1], np.nan)
  for latent in np.flatnonzero((activations != 0).any(axis=0)):
    column = activations[:, latent]
    out[latent] = stats.auroc(column[hallucinated], column[~hallucinated])
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
                      max_new_tokens: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
  """Greedy answers of a batch, and the latent activations (first generated token, image mean)
  from one forward pass over the prompt and that token, as the model produced it."""
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
  first = dense_means(sae, hidden[:, length], torch.arange(batch, device=hidden.device), batch)
  image = (inputs["input_ids"] == loaded.layout.image_token_id) & mask.bool()
  owners = torch.arange(batch, device=hidden.device)[:, None].expand_as(image)[image]
  return answers, first, dense_means(sae, hidden[:, :length][image], owners, batch)


def per_item(task_name: str, records: list[dict]) -> dict[str, np.ndarray]:
  """Per-answer arrays the bootstrap resamples: correct, and for POPE predicted / true yes."""
  if task_name == "pope":
    predicted = np.array([r["parsed"] == "yes" for r in records])
    truth = np.array([r["label"] == "yes" for r in records])
    return {"correct": predicted == truth, "predicted": predicted, "truth": truth}
  return {"correct": np.array([bool(r["correct"]) for r in records])}


def resampled_metrics(arrays: dict[str, np.ndarray], indices: np.ndarray) -> dict[str, np.ndarray]:
  """accuracy (and for POPE F1, "yes" positive, 0 without positives) of each row of indices."""
  out = {"accuracy": arrays["correct"][indices].mean(-1)}
  if "predicted" in arrays:
    predicted, truth = arrays["predicted"][indices], arrays["truth"][indices]
    tp = (predicted & truth).sum(-1)
    wrong = (predicted != truth).sum(-1)
    out["f1"] = np.divide(2 * tp, 2 * tp + wrong, out=np.zeros(len(tp)), where=2 * tp + wrong > 0)
  return out


def compare(plain: dict[str, np.ndarray], steered: dict[str, np.ndarray], resamples: int,
            seed: int) -> dict:
  """Each metric's change steered - plain, with its paired bootstrap 95% interval."""
  n = len(plain["correct"])
  everything = np.arange(n)[None]
  out = {}
  for name in resampled_metrics(plain, everything):
    delta = lambda idx: (resampled_metrics(steered, idx)[name] -
                         resampled_metrics(plain, idx)[name])
    out[name] = {"plain": float(resampled_metrics(plain, everything)[name][0]),
                 "steered": float(resampled_metrics(steered, everything)[name][0]),
                 "delta": float(delta(everything)[0]),
                 "ci95": list(stats.paired_bootstrap_ci(delta, n, resamples, seed))}
  return out


def hallucinated_labels(task_name: str, records: list[dict]) -> np.ndarray:
  """1 where the answer is wrong (POPE) or not judged correct (HallusionBench)."""
  return ~per_item(task_name, records)["correct"]
