"""Export folders: one format each, usual file permissions."""

import json
import os

import numpy as np
import pytest

from sae_jax import dictionary

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
  """A dictionary in `layout` whose cfg.json has the given keys changed, as another tool wrote it."""
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
  assert "\n" not in str(e.value) and str(folder) in str(e.value) and f"{first} export" in str(e.value)
  assert sorted(p.name for p in folder.iterdir()) == before
  dictionary.write(tmp_path, "hp", random_params(1), k=K, layout=first)  # same format: overwritten
  np.testing.assert_array_equal(dictionary.read(folder)[0]["W_enc"], random_params(1)["W_enc"])
