"""Per-latent CLIP scores and their baselines, from embeddings (numpy, float64).

For a latent with text t (its explanation, or the refined label) and image embeddings x:
  clip_score         mean over the images shown to the explainer of 100 * max(cos(t, x), 0)
                     (the paper's metric, torchmetrics' CLIPScore per image)
  random_baseline    the same mean over `draws` draws of as many random images of the pool
                     (the paper's 30 x 5); the pool may contain the latent's own top images
  shuffled_baseline  the same mean over the latent's shown images, with the text of another latent
                     (a derangement of the texts over the scored latents)
  heldout_auroc      AUROC of cos(t, x) for the top images NOT shown to the explainer against random
                     pool images that are not in the latent's top list (TOPACTS records no per-image
                     firing, so "not among the top images" stands in for "non-firing")
Every random choice comes from a generator seeded with (seed, latent, purpose), so a latent's
baselines do not depend on which other latents are scored.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from eval.metrics import stats

RANDOM_IMAGES, NEGATIVE_IMAGES, DERANGEMENT = 0, 1, 2  # the purposes that seed the generators
SCORE_NAMES = ("clip_score", "random_baseline", "shuffled_baseline", "heldout_auroc")
# The aggregates of a run, in reading order: each score, and the paired differences to the baselines.
DIFFERENCES = {"score_minus_random": "random_baseline", "score_minus_shuffled": "shuffled_baseline"}
METRIC_NAMES = ("clip_score", "random_baseline", "shuffled_baseline", *DIFFERENCES, "heldout_auroc")


@dataclasses.dataclass(frozen=True)
class LatentImages:
  latent: int
  shown: np.ndarray  # ids of the top images the explainer saw
  heldout: np.ndarray  # ids of the other top images
  random: np.ndarray  # [draws, len(shown)] ids drawn from the pool
  negatives: np.ndarray  # ids from the pool outside the latent's top list

  def all_ids(self) -> np.ndarray:
    return np.concatenate([self.shown, self.heldout, self.random.ravel(), self.negatives])


def random_images(pool: np.ndarray, latent: int, draws: int, size: int, seed: int) -> np.ndarray:
  """[draws, size] ids: each draw is `size` distinct pool images."""
  rng = np.random.default_rng([seed, latent, RANDOM_IMAGES])
  size = min(size, len(pool))
  return np.stack([pool[rng.choice(len(pool), size, replace=False)] for _ in range(draws)]) \
      if draws else np.zeros((0, size), np.int64)


def negative_images(pool: np.ndarray, latent: int, top: np.ndarray, count: int,
                    seed: int) -> np.ndarray:
  """Up to `count` distinct pool images outside `top`."""
  rng = np.random.default_rng([seed, latent, NEGATIVE_IMAGES])
  candidates = pool[~np.isin(pool, top)]
  return candidates[rng.choice(len(candidates), min(count, len(candidates)), replace=False)]


def plan(latent: int, top: np.ndarray, shown: np.ndarray, pool: np.ndarray, draws: int,
         negatives: int, seed: int) -> LatentImages:
  """The images scored for one latent; `top` is its whole top list (best first)."""
  return LatentImages(latent, shown, top[~np.isin(top, shown)],
                      random_images(pool, latent, draws, len(shown), seed),
                      negative_images(pool, latent, np.union1d(top, shown), negatives, seed))


def derangement(n: int, seed: int) -> np.ndarray | None:
  """A uniformly random permutation without fixed points (None when n < 2)."""
  if n < 2:
    return None
  rng = np.random.default_rng([seed, DERANGEMENT])
  while True:  # about e tries on average
    perm = rng.permutation(n)
    if not np.any(perm == np.arange(n)):
      return perm


def unit_rows(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def clip_score(cosines: np.ndarray) -> np.ndarray:
  return 100 * np.maximum(cosines, 0)


def score_latents(plans: list[LatentImages], text_embeddings: np.ndarray,
                  image_ids: np.ndarray, image_embeddings: np.ndarray, seed: int) -> list[dict]:
  """One row of scores per plan; `text_embeddings[i]` is plan i's text, `image_embeddings[r]` the
  embedding of image `image_ids[r]`."""
  texts, images = unit_rows(text_embeddings), unit_rows(image_embeddings)
  row_of = {int(i): r for r, i in enumerate(image_ids)}
  rows = lambda ids: images[[row_of[int(i)] for i in np.ravel(ids)]]
  perm = derangement(len(plans), seed)
  out = []
  for n, p in enumerate(plans):
    shown = rows(p.shown)
    result = {"latent": p.latent,
              "clip_score": float(clip_score(shown @ texts[n]).mean()),
              "random_baseline": float(clip_score(rows(p.random) @ texts[n]).mean())
                                 if p.random.size else None,
              "shuffled_baseline": float(clip_score(shown @ texts[perm[n]]).mean())
                                   if perm is not None else None,
              "heldout_auroc": stats.auroc(rows(p.heldout) @ texts[n], rows(p.negatives) @ texts[n])
                               if len(p.heldout) and len(p.negatives) else None}
    out.append(result)
  return out
