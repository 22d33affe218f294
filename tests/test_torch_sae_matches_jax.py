"""The torch SAE of `interpret` loads our exports and computes the JAX model's latents."""

import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from interpret.sae import SAE as TorchSAE
from sae_jax import architectures
from sae_jax.formats import dictionary
from sae_jax.config import SAEConfig
from sae_jax.model import SparseAutoencoder

sys.path.insert(0, str(Path(__file__).parent))
from reference import saelens_rescaled_numpy  # noqa: E402


@pytest.mark.parametrize("decoder_norm", ["unit", "free"])
@pytest.mark.parametrize("layout", ["sparsify", "saelens"])
def test_same_latents_and_reconstruction_as_jax(tmp_path, layout, decoder_norm):
  cfg = SAEConfig(d_in=24, num_latents=96, k=6, decoder_norm=decoder_norm)
  model = SparseAutoencoder(cfg, rngs=nnx.Rngs(3))
  rng = np.random.default_rng(0)
  model.b_enc[...] = jnp.asarray(rng.normal(size=96) * 0.1, jnp.float32)
  model.b_dec[...] = jnp.asarray(rng.normal(size=24), jnp.float32)
  if decoder_norm == "free":
    model.W_dec[...] *= jnp.asarray(rng.uniform(0.3, 3.0, (96, 1)), jnp.float32)
  variables = {name: np.asarray(getattr(model, name)[...]) for name in dictionary.PARAM_NAMES}
  run = {"sae": {"architecture": "topk", "decoder_norm": decoder_norm}, "input_scale": 1.0}
  params = architectures.from_training(variables, run, step=0)  # the export's weights
  folder = dictionary.write(tmp_path, "model.layers.2", params, k=cfg.k, layout=layout)
  x = rng.normal(size=(200, 24)).astype(np.float32)

  # The JAX model against SAELens's TopK (rescale_acts_by_decoder_norm when free) in float64.
  z_ref, x_hat_ref = saelens_rescaled_numpy(variables, x, cfg.k)
  if decoder_norm == "unit":
    np.testing.assert_allclose(np.linalg.norm(variables["W_dec"], axis=1), 1, rtol=1e-6)
  values, indices = (np.asarray(a) for a in model.encode(jnp.asarray(x)))
  z_jax = np.zeros_like(z_ref)
  np.put_along_axis(z_jax, indices, values, 1)
  np.testing.assert_allclose(z_jax, z_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(model(x)), x_hat_ref, rtol=1e-4, atol=1e-4)

  torch_sae = TorchSAE.from_export(folder)
  t_values, t_indices = (a.numpy() for a in torch_sae.encode(torch.from_numpy(x)))
  np.testing.assert_array_equal(t_indices, indices)
  np.testing.assert_allclose(t_values, values, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(torch_sae(torch.from_numpy(x)).numpy(), np.asarray(model(x)),
                             rtol=1e-5, atol=1e-5)


def test_a_batchtopk_sae_with_free_decoder_norms_exports_its_jumprelu(tmp_path):
  """Free norms under BatchTopK: the threshold applies to value x norm, as the folded export's
  JumpReLU applies it to the folded pre-activation."""
  cfg = SAEConfig(d_in=24, num_latents=96, k=6, architecture="batchtopk", decoder_norm="free")
  model = SparseAutoencoder(cfg, rngs=nnx.Rngs(4))
  rng = np.random.default_rng(1)
  model.b_dec[...] = jnp.asarray(rng.normal(size=24), jnp.float32)
  model.W_dec[...] *= jnp.asarray(rng.uniform(0.3, 3.0, (96, 1)), jnp.float32)
  model.threshold[...] = jnp.float32(0.4)
  names = dictionary.PARAM_NAMES + ("threshold",)
  variables = {name: np.asarray(getattr(model, name)[...]) for name in names}
  run = {"sae": {"architecture": "batchtopk", "decoder_norm": "free", "threshold_start_step": 0},
         "input_scale": 1.0}
  params = architectures.from_training(variables, run, step=10)
  folder = dictionary.write(tmp_path, "model.layers.2", params, k=None, layout="saelens")
  x = rng.normal(size=(200, 24)).astype(np.float32)

  raw = {name: variables[name].astype(np.float64) for name in dictionary.PARAM_NAMES}
  norms = np.linalg.norm(raw["W_dec"], axis=1)
  scaled = np.maximum((x - raw["b_dec"]) @ raw["W_enc"].T + raw["b_enc"], 0) * norms
  z_ref = np.where(scaled > 0.4, scaled, 0)
  x_hat_ref = (z_ref / norms) @ raw["W_dec"] + raw["b_dec"]
  assert 0 < (z_ref > 0).sum(1).mean() < 48
  x_hat, code = model.cfg.arch.reconstruct(model, jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(code), z_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(x_hat), x_hat_ref, rtol=1e-4, atol=1e-4)

  torch_sae = TorchSAE.from_export(folder)
  t_values, t_indices = torch_sae.encode(torch.from_numpy(x))
  z_torch = np.zeros_like(z_ref)
  np.put_along_axis(z_torch, t_indices.numpy(), t_values.double().numpy(), 1)
  np.testing.assert_allclose(z_torch, z_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(torch_sae.decode(t_values, t_indices).numpy(), x_hat_ref,
                             rtol=1e-4, atol=1e-4)
