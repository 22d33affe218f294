"""The real SAELens (the dev extra) loads our SAELens export with its metadata and computes our
latents, and our reader folds SAELens's rescale_acts_by_decoder_norm as SAELens computes it."""

import json

import numpy as np
import pytest

import reference

from sae_jax.formats import dictionary

sae_lens = pytest.importorskip("sae_lens")
torch = pytest.importorskip("torch")

N, D, K = 64, 16, 6
HOOKPOINT = "model.language_model.layers.3"


def random_params(seed=0, decoder_norms=None):
  rng = np.random.default_rng(seed)
  w_dec = rng.normal(size=(N, D))
  w_dec *= (1.0 if decoder_norms is None else decoder_norms[:, None]) / np.linalg.norm(
      w_dec, axis=1, keepdims=True)
  return {"W_enc": rng.normal(size=(N, D)).astype(np.float32),
          "b_enc": (rng.normal(size=N) * 0.1).astype(np.float32),
          "W_dec": w_dec.astype(np.float32), "b_dec": rng.normal(size=D).astype(np.float32)}


def dense(values, indices):
  z = np.zeros((len(values), N))
  np.put_along_axis(z, indices, values, 1)
  return z


def test_saelens_loads_our_export_with_its_metadata(tmp_path):
  params = random_params()
  source = {"model": "llava-hf/llava-1.5-7b-hf", "store": "/data/store", "hookpoint": HOOKPOINT}
  folder = dictionary.write(tmp_path, HOOKPOINT, params, k=K, layout="saelens",
                            sidecar={"source": source})
  sae = sae_lens.SAE.load_from_disk(folder)

  assert type(sae).__name__ == "TopKSAE" and sae.cfg.k == K
  assert sae.cfg.metadata.hook_name == HOOKPOINT
  assert sae.cfg.metadata.model_name == source["model"]
  assert sae.cfg.metadata.dataset_path == source["store"]
  np.testing.assert_array_equal(sae.W_enc.detach().numpy(), params["W_enc"].T)
  np.testing.assert_array_equal(sae.W_dec.detach().numpy(), params["W_dec"])
  np.testing.assert_array_equal(sae.b_enc.detach().numpy(), params["b_enc"])
  np.testing.assert_array_equal(sae.b_dec.detach().numpy(), params["b_dec"])

  x = np.random.default_rng(1).normal(size=(40, D))
  values, indices = reference.encode_numpy(params, x, K)
  with torch.no_grad():
    z = sae.encode(torch.from_numpy(x).float()).double().numpy()
    x_hat = sae(torch.from_numpy(x).float()).double().numpy()
  np.testing.assert_allclose(z, dense(values, indices), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(x_hat, reference.decode_numpy(params, values, indices), rtol=1e-5,
                             atol=1e-5)


def saelens_and_ours(tmp_path, params, k, **cfg_edits):
  """A SAELens-layout folder of `params` with `cfg_edits` in its cfg.json (options our writer never
  sets), loaded by SAELens in float64 and read by us."""
  folder = dictionary.write(tmp_path, HOOKPOINT, params, k=k, layout="saelens")
  cfg = json.loads((folder / "cfg.json").read_text())
  (folder / "cfg.json").write_text(json.dumps({**cfg, **cfg_edits}))
  return sae_lens.SAE.load_from_disk(folder, dtype="float64"), dictionary.read(folder)[0]


def test_rescale_acts_by_decoder_norm_reads_as_saelens_computes_it(tmp_path):
  params = random_params(decoder_norms=np.random.default_rng(2).uniform(0.3, 3.0, N))
  sae, ours = saelens_and_ours(tmp_path, params, K, rescale_acts_by_decoder_norm=True)

  x = np.random.default_rng(3).normal(size=(40, D))
  values, indices = reference.encode_numpy(ours, x, K)
  with torch.no_grad():
    z = sae.encode(torch.from_numpy(x)).numpy()
    x_hat = sae(torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(dense(values, indices), z, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(reference.decode_numpy(ours, values, indices), x_hat, rtol=1e-5,
                             atol=1e-5)


def with_threshold(params, seed=4):
  rng = np.random.default_rng(seed)
  return {**params, "threshold": rng.uniform(0.5, 5.0, N).astype(np.float32)}


def test_saelens_loads_our_jumprelu_export(tmp_path):
  """A BatchTopK export: SAELens's JumpReLUSAE, whose latents and reconstruction equal the float64
  reference and our torch SAE's."""
  from interpret.sae import SAE
  params = with_threshold(random_params())
  folder = dictionary.write(tmp_path, HOOKPOINT, params, k=None, layout="saelens")
  sae = sae_lens.SAE.load_from_disk(folder)
  assert type(sae).__name__ == "JumpReLUSAE" and sae.cfg.metadata.hook_name == HOOKPOINT
  np.testing.assert_array_equal(sae.threshold.detach().numpy(), params["threshold"])

  x = np.random.default_rng(5).normal(size=(40, D))
  z_ref, x_hat_ref = reference.jumprelu_numpy(params, x)
  ours = SAE.from_export(folder)
  with torch.no_grad():
    z = sae.encode(torch.from_numpy(x).float()).double().numpy()
    x_hat = sae(torch.from_numpy(x).float()).double().numpy()
    values, indices = ours.encode(torch.from_numpy(x).float())
  assert 0 < (z_ref > 0).sum() < z_ref.size / 2
  np.testing.assert_array_equal(z > 0, z_ref > 0)
  np.testing.assert_allclose(z, z_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(x_hat, x_hat_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dense(values.double().numpy(), indices.numpy()), z, rtol=1e-5,
                             atol=1e-5)


def test_a_gemma_scope_style_jumprelu_reads_as_saelens_computes_it(tmp_path):
  """Per-latent thresholds and apply_b_dec_to_input=false, as SAELens's Gemma Scope loader sets."""
  params = with_threshold(random_params(6), seed=7)
  sae, ours = saelens_and_ours(tmp_path, params, None, apply_b_dec_to_input=False)

  x = np.random.default_rng(8).normal(size=(40, D))
  with torch.no_grad():
    z = sae.encode(torch.from_numpy(x)).numpy()
    x_hat = sae(torch.from_numpy(x)).numpy()
  ours_z, ours_x_hat = reference.jumprelu_numpy(ours, x)
  assert 0 < (z > 0).sum() < z.size / 2
  np.testing.assert_array_equal(ours_z > 0, z > 0)
  np.testing.assert_allclose(ours_z, z, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ours_x_hat, x_hat, rtol=1e-5, atol=1e-5)


def test_saelens_loads_the_export_through_its_registry_entry(tmp_path, monkeypatch):
  """sae_jax.export --format=saelens writes the folder's pretrained_saes.yaml entry and model card;
  SAELens's own registry reader takes the entry and SAE.from_pretrained loads the folder through
  it, from a Hugging Face cache holding the folder as the entry's repo (no network)."""
  import shutil
  import subprocess
  import sys

  import huggingface_hub.constants as hf_constants
  from sae_lens.loading import pretrained_saes_directory as registry

  import synthetic
  import training

  store = synthetic.write_sparse_store(tmp_path / "store", num_shards=2)
  training.train(store, tmp_path / "run", "--steps=5")
  quality = tmp_path / "sae_quality.json"
  quality.write_text(json.dumps({"num_tokens": 4096, "fvu": 0.1234, "loss_recovered": 0.9}))
  export = tmp_path / "export"
  result = subprocess.run(
      [sys.executable, "-m", "sae_jax.export", f"--workdir={tmp_path / 'run'}", f"--out={export}",
       "--format=saelens", "--release=tiny-release", "--hf_repo=someone/tiny-saes",
       f"--evals={quality}"], capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  [folder] = [p for p in export.iterdir() if p.is_dir()]
  metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  final = metrics[-1]

  # Hugging Face's cache layout of repo someone/tiny-saes at one commit, offline.
  commit = "0" * 40
  repo = tmp_path / "hub" / "models--someone--tiny-saes"
  shutil.copytree(export, repo / "snapshots" / commit)
  (repo / "refs").mkdir()
  (repo / "refs" / "main").write_text(commit)
  monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
  monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
  # SAELens's registry, as if our entry were in its sae_lens/pretrained_saes.yaml.
  monkeypatch.setattr(registry, "files", lambda package: export)
  registry.get_pretrained_saes_directory.cache_clear()
  try:
    entry = registry.get_pretrained_saes_directory()["tiny-release"]
    sae = sae_lens.SAE.from_pretrained("tiny-release", folder.name)
  finally:
    registry.get_pretrained_saes_directory.cache_clear()

  assert entry.repo_id == "someone/tiny-saes" and entry.saes_map == {folder.name: folder.name}
  assert entry.model == json.loads((folder / "sae_jax.json").read_text())["source"]["model"]
  assert entry.expected_l0[folder.name] == pytest.approx(final["l0"])
  assert entry.expected_var_explained[folder.name] == pytest.approx(1 - final["fvu"])
  from_disk = sae_lens.SAE.load_from_disk(folder)
  for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
    torch.testing.assert_close(getattr(sae, name), getattr(from_disk, name), rtol=0, atol=0)
  assert sae.cfg.k == 4

  card = (export / "README.md").read_text()
  assert card.startswith("---\nlibrary_name: saelens\n")
  row = next(line for line in card.splitlines() if line.startswith(f"| {folder.name} |"))
  cells = [c.strip() for c in row.strip("|").split("|")]
  assert cells[2:4] == ["64", "4"]
  assert [float(c) for c in cells[6:9]] == pytest.approx(
      [final["fvu"], final["l0"], final["dead_fraction"]], rel=1e-3)
  assert '"loss_recovered": 0.9' in card and '"num_latents": 64' in card
