"""Export folders (one format each, usual file permissions) and foreign dictionaries read exactly or
refused: what `sae_jax.formats.dictionary` gives the torch side and `sae_jax.train --init_from`."""

import json
import os

import numpy as np
import pytest

import reference

from sae_jax.formats import dictionary
from sae_jax import architectures

N, D, K = 48, 12, 5
LAYOUTS = ["sparsify", "saelens"]


def random_params(seed=0, decoder_norms=None):
  rng = np.random.default_rng(seed)
  w_dec = rng.normal(size=(N, D))
  w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
  if decoder_norms is not None:
    w_dec *= decoder_norms[:, None]
  return {"W_enc": rng.normal(size=(N, D)).astype(np.float32),
          "b_enc": (rng.normal(size=N) * 0.1).astype(np.float32),
          "W_dec": w_dec.astype(np.float32), "b_dec": rng.normal(size=D).astype(np.float32)}


def write_foreign(tmp_path, layout, params=None, **cfg_changes):
  """A dictionary in `layout` whose cfg.json has the given keys changed, as another tool would."""
  folder = dictionary.write(tmp_path, "hp", params or random_params(), k=K, layout=layout)
  cfg = json.loads((folder / "cfg.json").read_text())
  (folder / "cfg.json").write_text(json.dumps({**cfg, **cfg_changes}))
  return folder


@pytest.fixture
def umask():
  """Sets the process umask for the test and restores it after."""
  old = os.umask(0o022)
  yield lambda mask: os.umask(mask)
  os.umask(old)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o027, 0o640)], ids=["022", "027"])
def test_exported_files_get_the_umask_permissions(tmp_path, umask, layout, mask, mode):
  umask(mask)
  folder = dictionary.write(tmp_path, "hp", random_params(), k=K, layout=layout, sidecar={})
  modes = {p.name: oct(p.stat().st_mode & 0o777) for p in folder.iterdir()}
  assert len(modes) == 3 and set(modes.values()) == {oct(mode)}, modes


@pytest.mark.parametrize("first,second", [("sparsify", "saelens"), ("saelens", "sparsify")])
def test_one_format_per_folder(tmp_path, first, second):
  folder = dictionary.write(tmp_path, "hp", random_params(), k=K, layout=first)
  before = sorted(p.name for p in folder.iterdir())
  with pytest.raises(dictionary.DictionaryError) as e:
    dictionary.write(tmp_path, "hp", random_params(1), k=K, layout=second)
  message = str(e.value)
  assert "\n" not in message and str(folder) in message and f"{first} export" in message
  assert sorted(p.name for p in folder.iterdir()) == before
  dictionary.write(tmp_path, "hp", random_params(1), k=K, layout=first)  # same format: overwritten
  np.testing.assert_array_equal(dictionary.read(folder)[0]["W_enc"], random_params(1)["W_enc"])


def test_a_folder_with_both_layouts_is_refused(tmp_path):
  folder = dictionary.write(tmp_path, "hp", random_params(), k=K, layout="sparsify")
  other = dictionary.write(tmp_path / "other", "hp", random_params(), k=K, layout="saelens")
  (folder / "sae_weights.safetensors").write_bytes((other / "sae_weights.safetensors").read_bytes())
  with pytest.raises(dictionary.DictionaryError, match="both sae.safetensors .* and "
                     "sae_weights.safetensors"):
    dictionary.read(folder)


@pytest.mark.parametrize("layout,changes,option", [
    ("saelens", {"normalize_activations": "expected_average_only_in"}, "normalize_activations"),
    ("saelens", {"normalize_activations": "constant_norm_rescale"}, "normalize_activations"),
    ("saelens", {"normalize_activations": "layer_norm"}, "normalize_activations"),
    ("saelens", {"normalize_activations": "covariance_whitening"}, "normalize_activations"),
    ("saelens", {"normalize_activations": True}, "normalize_activations"),  # SAELens < 6
    ("sparsify", {"transcode": True}, "transcode"),
    ("sparsify", {"skip_connection": True}, "skip_connection"),
    ("sparsify", {"signed": True}, "signed"),
    ("sparsify", {"activation": "groupmax"}, "activation"),
])
def test_foreign_options_that_change_the_latents_are_refused(tmp_path, layout, changes, option):
  folder = write_foreign(tmp_path, layout, **changes)
  with pytest.raises(dictionary.DictionaryError) as e:
    dictionary.read(folder)
  message = str(e.value)
  assert "\n" not in message and f"{folder}/cfg.json" in message
  assert f"{option}={next(iter(changes.values()))!r}" in message


@pytest.mark.parametrize("layout,changes", [
    ("saelens", {"normalize_activations": "none", "rescale_acts_by_decoder_norm": False}),
    ("saelens", {"normalize_activations": False}),  # SAELens < 6 wrote a bool
    ("sparsify", {"transcode": False, "skip_connection": False, "signed": False,
                  "activation": "topk"}),
])
def test_foreign_options_at_their_neutral_values_load(tmp_path, layout, changes):
  params = random_params()
  loaded, _ = dictionary.read(write_foreign(tmp_path, layout, params, **changes))
  for name in dictionary.PARAM_NAMES:
    np.testing.assert_array_equal(loaded[name], params[name])


def test_unexpected_tensors_are_refused(tmp_path):
  from safetensors.numpy import load_file, save_file
  folder = dictionary.write(tmp_path, "hp", random_params(), k=K, layout="sparsify")
  tensors = load_file(str(folder / "sae.safetensors"))
  save_file({**tensors, "W_skip": np.zeros((D, D), np.float32)}, str(folder / "sae.safetensors"))
  with pytest.raises(dictionary.DictionaryError, match=r"sae.safetensors: unexpected tensors "
                     r"\['W_skip'\]"):
    dictionary.read(folder)


def test_saelens_rescale_acts_by_decoder_norm_is_folded_exactly(tmp_path):
  norms = np.random.default_rng(5).uniform(0.3, 3.0, N)
  params = random_params(decoder_norms=norms)
  folder = write_foreign(tmp_path, "saelens", params, rescale_acts_by_decoder_norm=True)
  loaded, _ = dictionary.read(folder)
  np.testing.assert_allclose(np.linalg.norm(loaded["W_dec"], axis=1), 1.0, rtol=1e-6)

  x = np.random.default_rng(6).normal(size=(64, D))
  z, x_hat = reference.saelens_rescaled_numpy(params, x, K)
  values, indices = reference.encode_numpy(loaded, x, K)
  np.testing.assert_array_equal(np.sort(indices, 1), np.sort(np.argsort(-z, 1)[:, :K], 1))
  np.testing.assert_allclose(values, np.take_along_axis(z, indices, 1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(reference.decode_numpy(loaded, values, indices), x_hat, rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_hookpoint_comes_from_the_exports_metadata(tmp_path, layout):
  sidecar = {"source": {"hookpoint": "model.language_model.layers.3", "layer": 3}}
  folder = dictionary.write(tmp_path, "model.language_model.layers.3", random_params(), k=K,
                            layout=layout, sidecar=sidecar)
  renamed = folder.rename(tmp_path / "my_sae")  # a user's copy under another name
  assert dictionary.read(renamed)[1]["hookpoint"] == "model.language_model.layers.3"
  if layout == "saelens":  # SAELens's own metadata, without our sidecar
    (renamed / dictionary.SIDECAR).unlink()
    assert dictionary.read(renamed)[1]["hookpoint"] == "model.language_model.layers.3"


def test_a_folder_named_for_another_layer_is_refused(tmp_path):
  sidecar = {"source": {"hookpoint": "model.layers.3", "layer": 3}}
  with pytest.raises(dictionary.DictionaryError, match="named for layer 5.*model.layers.3"):
    dictionary.write(tmp_path, "model.layers.5", random_params(), k=K, layout="sparsify",
                     sidecar=sidecar)
  folder = dictionary.write(tmp_path, "model.layers.3", random_params(), k=K, layout="sparsify",
                            sidecar=sidecar)
  with pytest.raises(dictionary.DictionaryError, match="named for layer 5.*model.layers.3"):
    dictionary.read(folder.rename(tmp_path / "model.layers.5"))
  # A foreign sparsify export has no metadata: its folder name is its hookpoint, as in sparsify.
  plain = dictionary.write(tmp_path / "plain", "model.layers.7", random_params(), k=K,
                           layout="sparsify")
  assert dictionary.read(plain)[1]["hookpoint"] == "model.layers.7"


def with_threshold(params, seed=7, low=0.5, high=4.0):
  """A JumpReLU dictionary: per-latent thresholds spread over the pre-activations' range."""
  rng = np.random.default_rng(seed)
  return {**params, "threshold": rng.uniform(low, high, N).astype(np.float32)}


def test_jumprelu_round_trips_in_the_saelens_layout(tmp_path):
  params = with_threshold(random_params())
  folder = dictionary.write(tmp_path, "hp", params, k=None, layout="saelens")
  cfg = json.loads((folder / "cfg.json").read_text())
  assert cfg["architecture"] == "jumprelu" and "k" not in cfg and cfg["apply_b_dec_to_input"]
  loaded, info = dictionary.read(folder)
  assert info["architecture"] == "jumprelu" and info["k"] is None
  assert set(loaded) == set(params)
  for name, value in params.items():
    np.testing.assert_array_equal(loaded[name], value)


def test_jumprelu_is_refused_in_the_sparsify_layout(tmp_path):
  with pytest.raises(dictionary.DictionaryError) as e:
    dictionary.write(tmp_path, "hp", with_threshold(random_params()), k=None, layout="sparsify")
  message = str(e.value)
  assert "\n" not in message and "--format=sparsify" in message and "--format=saelens" in message
  assert not (tmp_path / "hp").exists()


@pytest.mark.parametrize("threshold,k", [(True, K), (False, None)])
def test_k_is_for_topk_only(tmp_path, threshold, k):
  params = with_threshold(random_params()) if threshold else random_params()
  with pytest.raises(dictionary.DictionaryError, match="a TopK dictionary needs k"):
    dictionary.write(tmp_path, "hp", params, k=k, layout="saelens")


def test_input_scale_folds_the_threshold():
  """An SAE trained on s*x, folded, computes z/s and x_hat/s on x (float64 reference)."""
  scale = 3.7
  params = with_threshold(random_params(), low=1.0, high=10.0)
  x = np.random.default_rng(8).normal(size=(200, D))
  z_scaled, x_hat_scaled = reference.jumprelu_numpy(params, scale * x)
  z, x_hat = reference.jumprelu_numpy(dictionary.fold_input_scale(params, scale), x)
  assert 0 < (z > 0).sum() < z.size / 2  # some latents are cut by the threshold, some kept
  np.testing.assert_array_equal(z > 0, z_scaled > 0)
  np.testing.assert_allclose(z, z_scaled / scale, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(x_hat, x_hat_scaled / scale, rtol=1e-5, atol=1e-6)


def test_a_batchtopk_runs_threshold_goes_to_every_latent_folded():
  params = random_params()
  run = {"sae": {"architecture": "batchtopk", "threshold_start_step": 5}, "input_scale": 2.0}
  exported = architectures.from_training({**params, "threshold": np.float32(3.0)}, run, step=9)
  np.testing.assert_array_equal(exported["threshold"], np.full(N, 1.5, np.float32))
  np.testing.assert_array_equal(exported["b_enc"], params["b_enc"] / np.float32(2.0))
  topk = architectures.from_training(params, {"sae": {"k": K}, "input_scale": 1.0}, step=9)
  assert set(topk) == set(dictionary.PARAM_NAMES)


def test_an_unlearned_threshold_is_refused():
  run = {"sae": {"architecture": "batchtopk", "threshold_start_step": 50}, "input_scale": 1.0}
  with pytest.raises(dictionary.DictionaryError) as e:
    architectures.from_training({**random_params(), "threshold": np.float32(-1)}, run, step=20)
  message = str(e.value)
  assert "\n" not in message and "step 20" in message and "--threshold_start_step=50" in message


def test_apply_b_dec_to_input_false_is_folded_into_b_enc(tmp_path):
  """Gemma Scope's form, pre = W_enc x + b_enc, with per-latent thresholds; the same for TopK."""
  params = with_threshold(random_params())
  folder = dictionary.write(tmp_path / "jumprelu", "hp", params, k=None, layout="saelens")
  cfg = json.loads((folder / "cfg.json").read_text())
  (folder / "cfg.json").write_text(json.dumps({**cfg, "apply_b_dec_to_input": False}))
  loaded, _ = dictionary.read(folder)
  x = np.random.default_rng(9).normal(size=(200, D))
  z, x_hat = reference.jumprelu_numpy(params, x, apply_b_dec_to_input=False)
  ours_z, ours_x_hat = reference.jumprelu_numpy(loaded, x)
  assert 0 < (z > 0).sum() < z.size / 2
  np.testing.assert_array_equal(ours_z > 0, z > 0)
  np.testing.assert_allclose(ours_z, z, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ours_x_hat, x_hat, rtol=1e-5, atol=1e-5)

  topk = write_foreign(tmp_path / "topk", "saelens", random_params(), apply_b_dec_to_input=False)
  loaded, _ = dictionary.read(topk)
  values, indices = reference.encode_numpy({**random_params(), "b_dec": np.zeros(D)}, x, K)
  ours_values, ours_indices = reference.encode_numpy(loaded, x, K)
  np.testing.assert_array_equal(ours_indices, indices)
  np.testing.assert_allclose(ours_values, values, rtol=1e-5, atol=1e-5)
