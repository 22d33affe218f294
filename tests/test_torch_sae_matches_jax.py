"""The torch SAE of `interpret` loads our exports and computes the JAX model's latents."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from interpret.sae import SAE as TorchSAE
from sae_jax.formats import dictionary
from sae_jax.config import SAEConfig
from sae_jax.model import SparseAutoencoder


@pytest.mark.parametrize("layout", ["sparsify", "saelens"])
def test_same_latents_and_reconstruction_as_jax(tmp_path, layout):
  cfg = SAEConfig(d_in=24, num_latents=96, k=6)
  model = SparseAutoencoder(cfg, rngs=nnx.Rngs(3))
  rng = np.random.default_rng(0)
  model.b_enc[...] = jnp.asarray(rng.normal(size=96) * 0.1, jnp.float32)
  model.b_dec[...] = jnp.asarray(rng.normal(size=24), jnp.float32)
  params = {name: np.asarray(getattr(model, name)[...]) for name in dictionary.PARAM_NAMES}
  folder = dictionary.write(tmp_path, "model.layers.2", params, k=cfg.k, layout=layout)
  x = rng.normal(size=(200, 24)).astype(np.float32)

  values, indices = (np.asarray(a) for a in model.encode(jnp.asarray(x)))
  torch_sae = TorchSAE.from_export(folder)
  t_values, t_indices = (a.numpy() for a in torch_sae.encode(torch.from_numpy(x)))
  np.testing.assert_array_equal(t_indices, indices)
  np.testing.assert_allclose(t_values, values, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(torch_sae(torch.from_numpy(x)).numpy(), np.asarray(model(x)),
                             rtol=1e-5, atol=1e-5)
