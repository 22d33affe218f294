"""eval.sae_quality against direct computations on tiny LLaVA models."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import reference
import steer_fixtures
from eval import sae_quality
from harvest import hooks, images, llava
from interpret.sae import SAE

LAYER = 0


def direct_logits(loaded, inputs, substitute=None):
  """Full-model logits, with decoder block LAYER's output replaced by `substitute` if given."""
  _, blocks = hooks.find_decoder_layers(loaded.model)
  handle = None
  if substitute is not None:
    handle = blocks[LAYER].register_forward_hook(
        lambda m, a, out: (substitute, *out[1:]) if isinstance(out, tuple) else substitute)
  try:
    return loaded.model(**inputs).logits.float()
  finally:
    if handle is not None:
      handle.remove()


@pytest.mark.parametrize("kind", ["llava", "llava_next"])
@torch.no_grad()
def test_metrics_match_a_direct_computation(kind, tiny_model, synthetic_images, tmp_path):
  loaded = llava.load_llava(str(tiny_model(kind)), "float32", "cpu")
  sae = SAE.from_export(steer_fixtures.write_export(
      tmp_path, steer_fixtures.random_params(loaded.d_model, n=48, bias=0.02), k=4))
  inputs = images.open_inputs(str(synthetic_images))
  prompt = "Write a short caption for this image."
  result = sae_quality.evaluate(loaded, sae, LAYER, inputs, prompt_mode="chat", prompt=prompt,
                                token_mode="all", batch_size=2, max_images=2, dense_threshold=0.1)

  # The same batch, by hand.
  texts = [llava.prompt_text(loaded.processor, "chat", prompt)] * 2
  encoded = llava.encode_batch(loaded.processor, [inputs.load(0), inputs.load(1)], texts)
  ids, real = encoded["input_ids"], encoded["attention_mask"].bool()
  b, t = ids.shape
  with hooks.LayerCapture(loaded.model, [LAYER], stop_after_last=True) as capture:
    x = capture.capture(lambda: loaded.model(**encoded), torch.arange(b).repeat_interleave(t),
                        torch.arange(t).repeat(b))[LAYER].reshape(b, t, -1)
  selected = real & (ids != loaded.layout.bos_token_id)  # --tokens=all: every real token but BOS
  rows = x[selected]
  x_hat = sae(rows)
  assert result["num_tokens"] == len(rows)
  fvu = ((rows - x_hat) ** 2).sum() / ((rows - rows.mean(0)) ** 2).sum()
  assert result["fvu"] == pytest.approx(float(fvu), rel=1e-4)
  values, indices = sae.encode(rows)
  fired = torch.zeros(sae.num_latents)
  fired.index_add_(0, indices[values > 0], torch.ones(int((values > 0).sum())))
  assert result["l0"] == pytest.approx(float((values > 0).sum(-1).float().mean()))
  assert result["dead_fraction"] == pytest.approx(float((fired == 0).float().mean()))
  assert result["dense_fraction"] == pytest.approx(float((fired / len(rows) > 0.1).float().mean()))

  targets = real[:, 1:] & (ids[:, 1:] != loaded.layout.image_token_id) & (
      ids[:, 1:] != loaded.layout.bos_token_id)
  labels = ids[:, 1:][targets]
  assert result["text_targets"] == len(labels)

  def loss_and_logp(substitute=None):
    logits = direct_logits(loaded, encoded, substitute)[:, :-1][targets]
    return float(F.cross_entropy(logits, labels)), torch.log_softmax(logits, -1)

  clean_loss, clean_logp = loss_and_logp()
  spliced, zeroed = x.clone(), x.clone()
  spliced[selected] = x_hat
  zeroed[selected] = 0
  sae_loss, sae_logp = loss_and_logp(spliced)
  zero_loss, _ = loss_and_logp(zeroed)
  assert result["loss"]["clean"] == pytest.approx(clean_loss, rel=1e-5)
  assert result["loss"]["sae"] == pytest.approx(sae_loss, rel=1e-5)
  assert result["loss"]["zero"] == pytest.approx(zero_loss, rel=1e-5)
  assert sae_loss != pytest.approx(clean_loss, rel=1e-4)  # the splice matters
  kl = F.kl_div(sae_logp, clean_logp, log_target=True, reduction="sum") / len(labels)
  assert result["kl"]["sae"] == pytest.approx(float(kl), rel=1e-4, abs=1e-7)
  # Reconstruction plus error is the identity: exactly the clean model.
  assert result["loss"]["sae_with_error"] == result["loss"]["clean"]
  assert result["kl"]["sae_with_error"] == 0.0
  assert result["loss_recovered"] == pytest.approx(
      (zero_loss - sae_loss) / (zero_loss - clean_loss), rel=1e-3)

  with pytest.raises(hooks.HookError, match="layer 7"):
    sae_quality.evaluate(loaded, sae, 7, inputs, prompt_mode="chat", prompt=prompt,
                         token_mode="all", batch_size=2, max_images=2, dense_threshold=0.1)


def test_command_line(tiny_model, synthetic_images, tmp_path):
  model = tiny_model("llava_next")
  steer_fixtures.write_export(tmp_path / "sae", steer_fixtures.random_params(64))
  proc = subprocess.run(
      [sys.executable, "-m", "eval.sae_quality", f"--model={model}", f"--sae={tmp_path / 'sae'}",
       f"--images={synthetic_images}", "--max_images=3", "--batch_size=2",
       "--tokens=base_patches", "--dtype=float32", f"--out={tmp_path / 'quality.json'}"],
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  assert summary["ok"] and summary["layer"] == 0 and summary["images"] == 3
  assert summary["num_tokens"] == 3 * 16  # the 4x4 base grid of each image
  assert summary["loss"]["sae_with_error"] == summary["loss"]["clean"]
  assert json.loads((tmp_path / "quality.json").read_text())["fvu"] == summary["fvu"]


def test_activation_metrics_of_a_jumprelu_match_the_float64_reference():
  """fvu, l0 and dead/dense fractions of a JumpReLU (BatchTopK export), rows in several chunks."""
  d, n = 16, 48
  params = steer_fixtures.random_params(d, n=n, bias=0.02)
  params["threshold"] = np.random.default_rng(3).uniform(0.2, 1.5, n).astype(np.float32)
  x = np.random.default_rng(4).normal(size=(2 * 1024 + 300, d)).astype(np.float32)
  totals = sae_quality.Totals(n)
  totals.add_activations(SAE(params, k=None), torch.from_numpy(x))
  result = totals.summary(dense_threshold=0.1)

  z, x_hat = reference.jumprelu_numpy(params, x)
  x64 = x.astype(np.float64)
  frequency = (z > 0).mean(0)
  assert result["fvu"] == pytest.approx(((x64 - x_hat) ** 2).sum()
                                        / ((x64 - x64.mean(0)) ** 2).sum(), rel=1e-5)
  assert result["l0"] == pytest.approx((z > 0).sum(1).mean(), rel=1e-6)
  assert 1 < result["l0"] < n / 2
  assert result["dead_fraction"] == pytest.approx((frequency == 0).mean())
  assert result["dense_fraction"] == pytest.approx((frequency > 0.1).mean())
