"""The torch SAE against the float64 numpy reference, for both export layouts and several dtypes,
and for a SAELens dictionary with rescale_acts_by_decoder_norm."""

import json

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import reference

from interpret.sae import SAE
from sae_jax.formats import dictionary

N, D, K = 64, 16, 6


def random_params(seed=0):
  rng = np.random.default_rng(seed)
  w_dec = rng.normal(size=(N, D)).astype(np.float32)
  w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
  return {"W_enc": rng.normal(size=(N, D)).astype(np.float32),
          "b_enc": rng.normal(size=N).astype(np.float32) * 0.1, "W_dec": w_dec,
          "b_dec": rng.normal(size=D).astype(np.float32)}


@pytest.mark.parametrize("layout", ["sparsify", "saelens"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_numpy_reference(tmp_path, layout, dtype):
  params = random_params()
  dictionary.write(tmp_path, "model.layers.1", params, k=K, layout=layout)
  sae = SAE.from_export(tmp_path, dtype=dtype)  # the export root: its one hookpoint is found
  x = np.random.default_rng(1).normal(size=(3, 5, D)).astype(np.float32)  # any leading shape

  values, indices = sae.encode(torch.from_numpy(x))
  ref_values, ref_indices = reference.encode_numpy(params, x.reshape(-1, D), K)
  assert values.shape == indices.shape == (3, 5, K)
  np.testing.assert_array_equal(indices.reshape(-1, K).numpy(), ref_indices)
  np.testing.assert_allclose(values.reshape(-1, K).double().numpy(), ref_values, rtol=1e-5, atol=1e-5)

  ref_x_hat = reference.decode_numpy(params, ref_values, ref_indices)
  np.testing.assert_allclose(sae(torch.from_numpy(x)).reshape(-1, D).double().numpy(), ref_x_hat,
                             rtol=1e-5, atol=1e-5)
  pre = sae.pre_activations(torch.from_numpy(x)).reshape(-1, N).double().numpy()
  np.testing.assert_allclose(np.take_along_axis(pre, ref_indices, 1), ref_values, rtol=1e-5, atol=1e-5)
  assert (pre >= 0).all()


def test_bfloat16_export_loads_bit_exact(tmp_path):
  folder = dictionary.write(tmp_path, "hp", random_params(), k=K, layout="sparsify", dtype="bfloat16")
  sae = SAE.from_export(folder, dtype=torch.bfloat16)
  stored = load_file(str(folder / "sae.safetensors"))["encoder.weight"].view(np.uint16)
  np.testing.assert_array_equal(sae.W_enc.view(torch.int16).numpy().view(np.uint16), stored)
  assert stored.dtype == np.uint16 and sae.W_enc.dtype == torch.bfloat16

  # bfloat16 arithmetic picks nearly the same latents as the float64 reference on the same weights.
  params = {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in random_params().items()}
  x = np.random.default_rng(2).normal(size=(32, D)).astype(np.float32)
  _, indices = sae.encode(torch.from_numpy(x))
  _, ref_indices = reference.encode_numpy(params, x, K)
  overlap = np.mean([len(set(a) & set(b)) / K for a, b in zip(indices.numpy(), ref_indices)])
  assert overlap > 0.9
  assert sae(torch.from_numpy(x)).dtype == torch.bfloat16


def test_saelens_rescale_acts_by_decoder_norm_matches_the_library_formula(tmp_path):
  params = random_params()
  params["W_dec"] *= np.random.default_rng(3).uniform(0.3, 3.0, N)[:, None].astype(np.float32)
  folder = dictionary.write(tmp_path, "hp", params, k=K, layout="saelens")
  cfg = json.loads((folder / "cfg.json").read_text())
  (folder / "cfg.json").write_text(json.dumps({**cfg, "rescale_acts_by_decoder_norm": True}))
  sae = SAE.from_export(folder, dtype=torch.float64)
  x = np.random.default_rng(4).normal(size=(32, D))

  z, x_hat = reference.saelens_rescaled_numpy(params, x, K)
  values, indices = sae.encode(torch.from_numpy(x))
  np.testing.assert_allclose(values.numpy(), np.take_along_axis(z, indices.numpy(), 1), rtol=1e-5)
  np.testing.assert_allclose(np.sort(values.numpy(), 1), np.sort(z, 1)[:, -K:], rtol=1e-5)
  np.testing.assert_allclose(sae(torch.from_numpy(x)).numpy(), x_hat, rtol=1e-5, atol=1e-5)


def test_foreign_options_it_cannot_compute_are_refused_by_name(tmp_path):
  folder = dictionary.write(tmp_path, "hp", random_params(), k=K, layout="saelens")
  cfg = json.loads((folder / "cfg.json").read_text())
  (folder / "cfg.json").write_text(json.dumps({**cfg, "normalize_activations": "layer_norm"}))
  with pytest.raises(dictionary.DictionaryError, match="normalize_activations='layer_norm'"):
    SAE.from_export(folder)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_jumprelu_matches_numpy_reference(tmp_path, dtype):
  """encode holds every latent above threshold: its width is the largest count over the rows,
  shorter rows padded with zeros; decode gives the reference reconstruction."""
  params = {**random_params(), "threshold": np.random.default_rng(5).uniform(
      0.5, 5.0, N).astype(np.float32)}
  dictionary.write(tmp_path, "model.layers.1", params, k=None, layout="saelens")
  sae = SAE.from_export(tmp_path, dtype=dtype)
  assert sae.jumprelu and sae.k is None
  x = np.random.default_rng(6).normal(size=(4, 10, D)).astype(np.float32)

  z_ref, x_hat_ref = reference.jumprelu_numpy(params, x.reshape(-1, D))
  counts = (z_ref > 0).sum(1)
  assert counts.min() < counts.max()  # rows of different widths
  values, indices = sae.encode(torch.from_numpy(x))
  width = counts.max()
  assert values.shape == indices.shape == (4, 10, width)
  values, indices = values.reshape(-1, width).double().numpy(), indices.reshape(-1, width).numpy()
  z = np.zeros_like(z_ref)
  np.put_along_axis(z, indices, values, 1)
  np.testing.assert_array_equal(z > 0, z_ref > 0)
  np.testing.assert_allclose(z, z_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal((values > 0).sum(1), counts)
  np.testing.assert_allclose(sae(torch.from_numpy(x)).reshape(-1, D).double().numpy(), x_hat_ref,
                             rtol=1e-5, atol=1e-5)
