"""Where a dictionary loses SynthSAEBench's MCC: the matched cosines by level of the hierarchy.

  python benchmarks/mcc_by_level.py --sae=EXPORT --store=STORE [--out=FILE.json]

SynthSAEBench's MCC (SAELens's `mean_correlation_coefficient`) is the mean |cosine| of the
decoder rows matched one to one to the true features (Hungarian matching). This script makes the
same matching and splits it by the matched feature's level in the synthetic model's hierarchy
(0: the roots; -1: features outside the hierarchy): per level, how many latents were matched
there and their mean cosine with their feature, with the feature's parent, with its most
negative and most positive sibling and with its children on average (signed, oriented so that
the cosine with the own feature is positive), and for every feature of the level the median of
its best cosine over all latents. A decoder row leaning on its parent or children, or away from
its siblings, is a latent that learned a mixture, the way hierarchy costs MCC. Prints one JSON
object (`--out`: also to a file).
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy.optimize import linear_sum_assignment

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval import synthetic  # noqa: E402
from sae_jax.formats import dictionary  # noqa: E402


def hierarchy_levels(model) -> tuple[np.ndarray, np.ndarray]:
  """(level, parent) of each feature of a SAELens SyntheticModel: -1 outside the hierarchy."""
  n = model.feature_dict.feature_vectors.shape[0]
  level, parent = np.full(n, -1), np.full(n, -1)
  stack = [(root, 0, -1) for root in (model.hierarchy.roots if model.hierarchy else [])]
  while stack:
    node, depth, up = stack.pop()
    level[node.feature_index], parent[node.feature_index] = depth, up
    stack.extend((child, depth + 1, node.feature_index) for child in node.children)
  return level, parent


def unit_rows(a: np.ndarray) -> np.ndarray:
  a = np.asarray(a, np.float64)
  return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def mcc_by_level(decoder: np.ndarray, features: np.ndarray, level: np.ndarray,
                 parent: np.ndarray) -> dict:
  """The Hungarian matching of decoder rows [n, d] to features [f, d], split by feature level."""
  cos = unit_rows(decoder) @ unit_rows(features).T
  latents, matched = linear_sum_assignment(-np.abs(cos))
  signed = cos[latents] * np.sign(cos[latents, matched])[:, None]  # own cosine positive
  own = signed[np.arange(len(latents)), matched]
  best = np.abs(cos).max(0)
  levels = {}
  for lv in sorted(set(level.tolist())):
    rows = np.where(level[matched] == lv)[0]
    entry = {"features": int((level == lv).sum()), "latents": int(len(rows)),
             "feature_best_cos_median": float(np.median(best[level == lv]))}
    if len(rows):
      entry["mean_cos"] = float(own[rows].mean())
      with_parent = rows[parent[matched[rows]] >= 0]
      if len(with_parent):
        entry["parent_cos"] = float(signed[with_parent, parent[matched[with_parent]]].mean())
        sibling_min, sibling_max = [], []
        for i in with_parent:
          f = matched[i]
          siblings = np.where((parent == parent[f]) & (np.arange(len(parent)) != f))[0]
          if len(siblings):
            sibling_min.append(signed[i, siblings].min())
            sibling_max.append(signed[i, siblings].max())
        if sibling_min:
          entry["sibling_cos_min"] = float(np.mean(sibling_min))
          entry["sibling_cos_max"] = float(np.mean(sibling_max))
      children = [np.where(parent == matched[i])[0] for i in rows]
      with_children = [(i, c) for i, c in zip(rows, children) if len(c)]
      if with_children:
        entry["children_cos"] = float(np.mean([signed[i, c].mean() for i, c in with_children]))
    levels[str(lv)] = entry
  return {"mcc": float(own.mean()), "num_latents": int(decoder.shape[0]), "levels": levels}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sae", required=True, help="an export (any layout `sae_jax.export` writes)")
  parser.add_argument("--store", required=True, help="a store written by `eval.synthetic write`")
  parser.add_argument("--out", type=Path, help="also write the JSON here")
  args = parser.parse_args()
  params, _ = dictionary.read(args.sae)
  model = synthetic.load_model(args.store)
  features = model.feature_dict.feature_vectors.detach().double().numpy()
  if params["W_dec"].shape[1] != features.shape[1]:
    raise SystemExit(f"{args.sae}: d_in {params['W_dec'].shape[1]} but the synthetic model of "
                     f"{args.store} has {features.shape[1]} dimensions")
  result = {"sae": args.sae, "store": args.store,
            **mcc_by_level(params["W_dec"], features, *hierarchy_levels(model))}
  text = json.dumps(result)
  print(text)
  if args.out:
    args.out.write_text(text + "\n")


if __name__ == "__main__":
  main()
