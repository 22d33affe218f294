"""eval.synthetic: a SynthSAEBench store written through our store writer, and SAELens's metrics of
an export on it, checked against a float64 numpy computation on the same seeded samples; the bad
inputs it refuses."""

import json
import subprocess
import sys

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

import reference
import synthetic as synthetic_stores

torch = pytest.importorskip("torch")
pytest.importorskip("sae_lens")

from eval import synthetic  # noqa: E402
from sae_jax.formats import dictionary# noqa: E402
from sae_jax.store import Store, StoreError  # noqa: E402

K, SAMPLES = 6, 2048


@pytest.fixture(scope="module")
def store(tmp_path_factory):
  out = tmp_path_factory.mktemp("synth") / "store"
  result = subprocess.run([sys.executable, "-m", "eval.synthetic", "write", "--model=tiny",
                           "--rows=3000", "--shard_rows=2048", "--dtype=float16", f"--out={out}"],
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  return out


def export(tmp_path, params):
  return dictionary.write(tmp_path, "synthetic", params, k=K, layout="saelens")


def pre_activations(params, x):
  return (x.astype(np.float64) - params["b_dec"]) @ params["W_enc"].T.astype(np.float64) \
      + params["b_enc"]


def numpy_metrics(params, store, seed=0):
  """SynthSAEBench's metrics in float64 numpy, on the samples `score` draws (one seeded batch):
  of a TopK-K dictionary, or of a JumpReLU where `params` has a threshold."""
  model = synthetic.load_model(store)
  truth = model.feature_dict.feature_vectors.detach().double().numpy()
  torch.manual_seed(2 ** 31 + 2 ** 30 + seed)  # the scored samples' stream
  acts = model.activation_generator.sample(SAMPLES).double().numpy()
  x = acts @ truth + model.feature_dict.bias.detach().double().numpy()
  if "threshold" in params:
    pre = pre_activations(params, x)
    z = np.where(pre > params["threshold"], np.maximum(pre, 0), 0)
  else:
    values, indices = reference.encode_numpy(params, x, K)
    z = np.zeros((SAMPLES, len(params["W_dec"])))
    np.put_along_axis(z, indices, values, 1)
  w = params["W_dec"].astype(np.float64)
  x_hat = z @ w + params["b_dec"]
  cos = np.abs((w / np.linalg.norm(w, axis=1, keepdims=True))
               @ (truth / np.linalg.norm(truth, axis=1, keepdims=True)).T)
  rows, cols = linear_sum_assignment(-cos)
  best = cos.argmax(1)
  fires, truth_fires = z > 0, acts[:, best] > 0
  tp = (fires & truth_fires).sum(0)
  precision = np.where(fires.sum(0) > 0, tp / np.maximum(fires.sum(0), 1), 0)
  recall = np.where(truth_fires.sum(0) > 0, tp / np.maximum(truth_fires.sum(0), 1), 0)
  f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall,
                                                                            1e-300), 0)
  variance = ((x - x.mean(0)) ** 2).sum(1).mean()
  return {"mcc": cos[rows, cols].mean(), "uniqueness": len(np.unique(best)) / len(w),
          "precision": precision.mean(), "recall": recall.mean(), "f1": f1.mean(),
          "explained_variance": 1 - ((x - x_hat) ** 2).sum(1).mean() / variance,
          "l0": fires.sum(1).mean(), "true_l0": (acts > 0).sum(1).mean(),
          "dead_latents": int((~fires.any(0)).sum())}


def true_feature_params(store):
  model = synthetic.load_model(store)
  truth = model.feature_dict.feature_vectors.detach().numpy().astype(np.float32)
  return {"W_enc": truth, "b_enc": np.zeros(len(truth), np.float32), "W_dec": truth,
          "b_dec": model.feature_dict.bias.detach().numpy().astype(np.float32)}


def random_params(store, seed=1):
  n, d = 384, Store(store).d_model
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(n, d)).astype(np.float32)
  return {"W_enc": w, "b_enc": np.zeros(n, np.float32), "W_dec": w / np.linalg.norm(w, axis=1,
                                                                                    keepdims=True),
          "b_dec": np.zeros(d, np.float32)}


def test_the_store_holds_the_models_samples(store):
  s = Store(store, verify=True)
  assert s.rows == 3000 and s.dtype == "float16" and len(s.shards) == 2
  model = synthetic.load_model(store)
  assert s.d_model == model.cfg.hidden_dim == synthetic.MODELS["tiny"]().hidden_dim
  # The rows are the model's samples, each shard drawn with its own seed (seed 0 -> shard i: i).
  for i, shard in enumerate(s.shards):
    torch.manual_seed(i)
    np.testing.assert_allclose(np.asarray(s.shard_acts(i), np.float32),
                               model.sample(shard.rows).numpy(), rtol=1e-3, atol=1e-2)


def test_score_is_saelens_metrics_as_numpy_computes_them(tmp_path, store):
  """The true dictionary (by the command) scores MCC 1; a random one (by the function) far less;
  every metric of both as float64 numpy computes it on the same samples."""
  true = true_feature_params(store)
  out = tmp_path / "score.json"
  result = subprocess.run([sys.executable, "-m", "eval.synthetic", "score",
                           f"--sae={export(tmp_path / 'true', true)}", f"--store={store}",
                           f"--samples={SAMPLES}", f"--batch_size={SAMPLES}", f"--out={out}"],
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  printed = json.loads(result.stdout.strip().splitlines()[-1])
  assert printed == json.loads(out.read_text())
  random = random_params(store)
  scored = synthetic.score(export(tmp_path / "random", random), store, samples=SAMPLES,
                           batch_size=SAMPLES)
  for params, got in ((true, printed), (random, scored)):
    for key, value in numpy_metrics(params, store).items():
      assert got[key] == pytest.approx(value, rel=1e-3, abs=1e-4), key
  assert printed["mcc"] > 0.999 and printed["uniqueness"] == 1.0
  assert scored["mcc"] < 0.7 and scored["uniqueness"] < 1.0


def test_l0_scores_a_jumprelu_at_that_l0(tmp_path, store):
  """--l0 scales every threshold by one factor, found on other samples of the model: there the
  scaled JumpReLU fires exactly l0 * samples times (counted in float64 numpy), and the metrics are
  those of the scaled dictionary as numpy computes them on the scored samples."""
  rng = np.random.default_rng(2)
  params = random_params(store)
  params["threshold"] = rng.uniform(0.5, 2.0, len(params["W_enc"])).astype(np.float32)
  folder = dictionary.write(tmp_path / "jumprelu", "synthetic", params, k=None, layout="saelens")
  samples, target = 2000, 5.0
  scored = synthetic.score(folder, store, samples=SAMPLES, batch_size=SAMPLES, l0=target,
                           calibration_samples=samples)
  model = synthetic.load_model(store)
  torch.manual_seed(2 ** 31)  # the calibration samples' stream
  with torch.no_grad():
    x = model.sample(samples).numpy()
  pre = pre_activations(params, x)
  assert scored["calibration_samples"] == samples and scored["l0_target"] == target
  scale = scored["threshold_scale"]
  assert (pre > scale * params["threshold"].astype(np.float64)).sum() == target * samples
  from sae_lens import SAE  # the same factor when the ratios are kept over small batches
  sae = SAE.load_from_disk(str(dictionary.find_dictionary(folder)))
  assert synthetic.l0_threshold_scale(sae, torch.from_numpy(x), target, folder, 300) == scale
  assert (pre > params["threshold"]).sum(1).mean() != pytest.approx(target, abs=0.5)  # it moved
  scaled = {**params, "threshold": params["threshold"] * np.float32(scale)}
  for key, value in numpy_metrics(scaled, store).items():
    assert scored[key] == pytest.approx(value, rel=1e-3, abs=1e-4), key
  assert scored["l0"] == pytest.approx(target, rel=0.15)  # other samples, the same distribution

  topk = export(tmp_path / "topk", random_params(store))
  with pytest.raises(dictionary.DictionaryError, match="topk SAE") as error:
    synthetic.score(topk, store, samples=SAMPLES, l0=target)
  assert str(topk) in str(error.value)
  with pytest.raises(dictionary.DictionaryError, match="out of range"):
    synthetic.score(folder, store, samples=SAMPLES, l0=1000.0)


def test_bad_inputs_are_refused_naming_the_file(tmp_path, store):
  d = Store(store).d_model
  narrow = {k: v[..., : d // 2] if k in ("W_enc", "W_dec", "b_dec") else v
            for k, v in random_params(store).items()}
  folder = export(tmp_path / "narrow", narrow)
  with pytest.raises(dictionary.DictionaryError, match="d_in") as error:
    synthetic.score(folder, store)
  assert str(folder / "cfg.json") in str(error.value)

  plain = synthetic_stores.write_store(tmp_path / "plain", np.ones((8, d), np.float32),
                                       num_shards=1)
  with pytest.raises(StoreError, match="synthetic_model_config.json") as error:
    synthetic.score(export(tmp_path / "ok", random_params(store)), plain)
  assert str(plain) in str(error.value)

  sparsify = dictionary.write(tmp_path / "sparsify", "synthetic", random_params(store), k=K,
                              layout="sparsify")
  with pytest.raises(dictionary.DictionaryError, match="format=saelens") as error:
    synthetic.score(sparsify, store)
  assert str(sparsify) in str(error.value)


def test_scored_and_calibration_samples_are_never_store_rows(store):
  """The three seed streams (the store's shards, --l0's calibration, the scored samples) draw
  different samples: the first rows of seed 0's stream (shard 0) are all in the store, while of
  those of the other two streams where a feature fires (the others are the model's bias alone)
  few are near a stored row (a single feature firing at about the same magnitude), by chance."""
  s = Store(store)
  rows = np.concatenate([np.asarray(s.shard_acts(i), np.float32) for i in range(len(s.shards))])
  model = synthetic.load_model(store)
  bias = model.feature_dict.bias.detach().numpy()

  def stored_share(seed):
    torch.manual_seed(seed)
    with torch.no_grad():
      drawn = model.sample(s.shards[0].rows).numpy()[:64]  # drawn as `write` draws a shard
    drawn = drawn[np.abs(drawn - bias).max(1) > 0.1]
    assert len(drawn) > 32
    # the same sample stored in float16: within its rounding (< 0.008 here) in every dimension
    return (np.abs(drawn[:, None] - rows[None]).max(2).min(1) < 0.01).mean()

  assert stored_share(2 ** 31) < 0.2 and stored_share(2 ** 31 + 2 ** 30) < 0.2
  assert stored_share(0) == 1


def test_rewriting_resumes_and_other_settings_are_refused(store):
  """A finished store rewritten with its flags is left as it is (a killed one resumes the same way,
  after its last shard); other flags are refused rather than mixed into it."""
  before = (store / "manifest.json").read_bytes()
  synthetic.write_store(store, synthetic.MODELS["tiny"](), 3000, dtype="float16", shard_rows=2048,
                        name="tiny", progress=False)
  assert (store / "manifest.json").read_bytes() == before
  with pytest.raises(StoreError, match="other settings"):
    synthetic.write_store(store, synthetic.MODELS["tiny"](), 4000, dtype="float16",
                          shard_rows=2048, name="tiny", progress=False)


def test_model_from_lends_the_model_without_building_it(tmp_path, store, monkeypatch):
  """A store written with --model_from takes the other store's model files as they are, builds
  none, and holds the same rows where the seeds meet; another model is refused naming the folder
  and leaves nothing behind."""
  real = synthetic.SyntheticModel

  class NoBuild:
    load_from_disk = staticmethod(real.load_from_disk)

    def __init__(self, *args, **kwargs):
      raise AssertionError("built a synthetic model")

  monkeypatch.setattr(synthetic, "SyntheticModel", NoBuild)
  bigger = synthetic.write_store(tmp_path / "bigger", synthetic.MODELS["tiny"](), 5000,
                                 dtype="float16", shard_rows=2048, name="tiny", progress=False,
                                 model_from=store)
  source, copy = store / synthetic.MODEL_DIR, bigger / synthetic.MODEL_DIR
  assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in source.iterdir())
  for path in source.iterdir():
    assert (copy / path.name).read_bytes() == path.read_bytes()
  old, new = Store(store), Store(bigger)
  assert new.rows == 5000
  for i in range(len(old.shards) - 1):  # the last of the 3000 rows' shards is a short one
    np.testing.assert_array_equal(np.asarray(new.shard_acts(i)), np.asarray(old.shard_acts(i)))

  with pytest.raises(StoreError, match="another synthetic model") as error:
    synthetic.write_store(tmp_path / "other", synthetic.MODELS["small"](), 10, name="small",
                          progress=False, model_from=store)
  assert str(source) in str(error.value) and "--model_from" in str(error.value)
  assert not (tmp_path / "other").exists()
