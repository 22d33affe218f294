"""benchmarks/mcc_by_level.py: SynthSAEBench's MCC split by the hierarchy level of the features."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from eval import synthetic

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "mcc_by_level.py"
spec = importlib.util.spec_from_file_location("mcc_by_level", SCRIPT)
mcc_by_level = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mcc_by_level)


@pytest.fixture(scope="module")
def model():
  from sae_lens.synthetic import SyntheticModel
  return SyntheticModel(synthetic.MODELS["tiny"]())  # 256 features in d 32, 2 roots


def test_levels_follow_the_configured_tree(model):
  level, parent = mcc_by_level.hierarchy_levels(model)
  counts = {lv: int((level == lv).sum()) for lv in range(4)}
  assert counts == {0: 2, 1: 8, 2: 32, 3: 128}  # 2 roots, branching 4, depth 3
  children = level >= 1
  assert (level[parent[children]] == level[children] - 1).all()
  assert (parent[level <= 0] == -1).all()


def test_true_features_score_one_and_levels_average_to_saelens_mcc(model):
  from sae_lens.synthetic.evals import mean_correlation_coefficient
  features = model.feature_dict.feature_vectors.detach().double().numpy()
  level, parent = mcc_by_level.hierarchy_levels(model)
  exact = mcc_by_level.mcc_by_level(features[::-1] * 3.0, features, level, parent)
  assert exact["mcc"] == pytest.approx(1.0)
  assert all(v["mean_cos"] == pytest.approx(1.0) for v in exact["levels"].values())

  decoder = np.random.default_rng(0).normal(size=(64, features.shape[1]))
  result = mcc_by_level.mcc_by_level(decoder, features, level, parent)
  reference = mean_correlation_coefficient(torch.tensor(decoder), torch.tensor(features))
  assert result["mcc"] == pytest.approx(reference, abs=1e-9)
  parts = [(v["latents"], v["mean_cos"]) for v in result["levels"].values() if v["latents"]]
  assert sum(n for n, _ in parts) == 64
  assert sum(n * c for n, c in parts) / 64 == pytest.approx(reference, abs=1e-9)


def test_a_row_leaning_on_its_parent_shows_in_parent_and_sibling_cosines(model):
  features = model.feature_dict.feature_vectors.detach().double().numpy()
  unit = features / np.linalg.norm(features, axis=1, keepdims=True)
  level, parent = mcc_by_level.hierarchy_levels(model)
  ones = np.where(level == 1)[0]
  rows = unit[ones] + 0.5 * unit[parent[ones]] - 0.3 * np.stack(
      [unit[(parent == parent[f]) & (np.arange(len(parent)) != f)].sum(0) for f in ones])
  rows /= np.linalg.norm(rows, axis=1, keepdims=True)
  result = mcc_by_level.mcc_by_level(rows, features, level, parent)["levels"]["1"]
  assert result["latents"] == len(ones)
  expected_parent, expected_min, expected_children = [], [], []
  for row, f in zip(rows, ones):
    expected_parent.append(row @ unit[parent[f]])
    expected_min.append(min(row @ unit[s] for s in np.where(parent == parent[f])[0] if s != f))
    expected_children.append(np.mean([row @ unit[c] for c in np.where(parent == f)[0]]))
  assert result["mean_cos"] == pytest.approx(np.mean([r @ unit[f] for r, f in zip(rows, ones)]))
  assert result["parent_cos"] == pytest.approx(np.mean(expected_parent))
  assert result["sibling_cos_min"] == pytest.approx(np.mean(expected_min))
  assert result["children_cos"] == pytest.approx(np.mean(expected_children))
  assert result["parent_cos"] > 0.3 and result["sibling_cos_min"] < -0.1
