"""Steering hooks on tiny LLaVA-1.5 and LLaVA-NeXT models with random tied SAEs."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import reference
import steer_fixtures
from harvest import hooks, images, llava
from interpret.sae import SAE
from interpret.steering import (Edit, Steering, SteeringError, edit_configs,
                                layer_of_hookpoint, load_sae, steering_for)
from sae_jax.formats import dictionary

ALWAYS_ON = 3  # fires at every position with a pre-activation of about 20
LAYER = 0
PROMPTS = ("Describe.", "What is in this picture? Where is the cat?")  # different lengths: padding


@pytest.fixture(scope="module", params=["llava", "llava_next"])
def setup(request, tiny_model, tmp_path_factory):
  loaded = llava.load_llava(str(tiny_model(request.param)), "float32", "cpu")
  folder = steer_fixtures.write_export(tmp_path_factory.mktemp("sae"), steer_fixtures.random_params(
      loaded.d_model, always_on=ALWAYS_ON))
  return loaded, SAE.from_export(folder)


def batch(loaded, prompts=PROMPTS, seeds=(0, 5)):
  texts = [llava.prompt_text(loaded.processor, "chat", p) for p in prompts]
  return llava.encode_batch(loaded.processor, [images.synthetic_image(s) for s in seeds], texts,
                            padding_side="left")


def steering(loaded, sae, edits, mode="clamp", positions="image", layer=LAYER) -> Steering:
  return steering_for(loaded, sae, layer, edits, mode, positions)


def residual(loaded, inputs, layer=LAYER):
  """Output of decoder block `layer` [B, T, d], as seen by hooks registered after the steering."""
  b, t = inputs["input_ids"].shape
  index = (torch.arange(b).repeat_interleave(t), torch.arange(t).repeat(b))
  with hooks.LayerCapture(loaded.model, [layer], stop_after_last=True) as capture:
    return capture.capture(lambda: loaded.model(**inputs), *index)[layer].reshape(b, t, -1)


def logits(loaded, inputs):
  return loaded.model(**inputs).logits


@torch.no_grad()
def test_clamp_to_current_value_and_ablating_a_silent_latent_change_nothing(setup):
  loaded, sae = setup
  inputs = batch(loaded)
  clean = logits(loaded, inputs)
  params = steer_fixtures.random_params(loaded.d_model, always_on=ALWAYS_ON)
  params["W_enc"][ALWAYS_ON] = 0  # its activation is b_enc = 20 at every position
  constant = SAE(params, k=sae.k)
  with steering(loaded, constant, [Edit(ALWAYS_ON, 20.0)], positions="all"):
    torch.testing.assert_close(logits(loaded, inputs), clean, rtol=1e-5, atol=1e-5)
  silent = int(sae.b_enc.argmin())  # rarely in the top k: ablating it changes (almost) nothing
  with steering(loaded, sae, [Edit(silent, 0.0)], mode="ablate", positions="all"):
    torch.testing.assert_close(logits(loaded, inputs), clean, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_clamp_sets_the_latent_and_keeps_everything_else(setup):
  loaded, sae = setup
  inputs = batch(loaded)
  x = residual(loaded, inputs)
  other = 7
  edits = [Edit(ALWAYS_ON, 5.0), Edit(other, 2.5)]
  with steering(loaded, sae, edits, positions="image"):
    edited = residual(loaded, inputs)
  image = (inputs["input_ids"] == loaded.layout.image_token_id) & inputs["attention_mask"].bool()
  assert torch.equal(edited[~image], x[~image])  # nothing outside the image tokens moves

  values, indices = sae.encode(x[image])
  current = {e.latent: (values * (indices == e.latent)).sum(-1, keepdim=True) for e in edits}
  expected = sum((e.value - current[e.latent]) * sae.W_dec[e.latent] for e in edits)
  torch.testing.assert_close(edited[image] - x[image], expected, rtol=1e-5, atol=1e-5)
  # Tied rows (w_f . d_f = 1): re-encoding reads the clamp value back for the always-on latent,
  # plus only what the other edit's direction adds along it.
  cross = (2.5 - current[other][:, 0]) * (sae.W_dec[other] @ sae.W_dec[ALWAYS_ON])
  torch.testing.assert_close(sae.pre_activations(edited[image])[:, ALWAYS_ON], 5.0 + cross,
                             rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_clamp_and_replace_with_a_jumprelu_sae_match_the_float64_reference(setup):
  """A JumpReLU (BatchTopK export) whose threshold cuts about half of the firing latents."""
  loaded, _ = setup
  inputs = batch(loaded)
  x = residual(loaded, inputs)
  real = inputs["attention_mask"].bool()
  params = steer_fixtures.random_params(loaded.d_model, always_on=ALWAYS_ON)
  pre = np.maximum(x[real].double().numpy() @ params["W_enc"].T.astype(np.float64)
                   + params["b_enc"], 0)
  params["threshold"] = np.full(len(params["b_enc"]), np.median(pre[pre > 0]), np.float32)
  sae = SAE(params, k=None)
  z, x_hat = reference.jumprelu_numpy(params, x[real].double().numpy())
  assert 0 < (z > 0).sum() < (pre > 0).sum()

  with steering(loaded, sae, [], mode="replace", positions="prompt"):
    replaced = residual(loaded, inputs)
  np.testing.assert_allclose(replaced[real].double().numpy(), x_hat, rtol=1e-5, atol=1e-5)
  other = 7
  with steering(loaded, sae, [Edit(ALWAYS_ON, 5.0), Edit(other, 2.5)], positions="prompt"):
    clamped = residual(loaded, inputs)
  expected = x[real].double().numpy() + (
      (5.0 - z[:, [ALWAYS_ON]]) * params["W_dec"][ALWAYS_ON] + (2.5 - z[:, [other]])
      * params["W_dec"][other])
  np.testing.assert_allclose(clamped[real].double().numpy(), expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_add_modes_move_along_the_decoder_rows(setup):
  loaded, sae = setup
  inputs = batch(loaded)
  x = residual(loaded, inputs)
  text = (inputs["input_ids"] != loaded.layout.image_token_id) & inputs["attention_mask"].bool()
  text &= inputs["input_ids"] != loaded.layout.bos_token_id
  with steering(loaded, sae, [Edit(5, 2.0), Edit(6, -1.0)], mode="add", positions="text"):
    added = residual(loaded, inputs)
  with steering(loaded, sae, [Edit(5, 0.2)], mode="add_scaled", positions="text"):
    scaled = residual(loaded, inputs)
  assert torch.equal(added[~text], x[~text]) and torch.equal(scaled[~text], x[~text])
  torch.testing.assert_close(added[text] - x[text],
                             (2.0 * sae.W_dec[5] - sae.W_dec[6]).expand(int(text.sum()), -1))
  torch.testing.assert_close(scaled[text] - x[text],
                             0.2 * x[text].norm(dim=-1, keepdim=True) * sae.W_dec[5])

  # Contexts nest (SSL: one direction on the image tokens, another one on the text).
  image = inputs["input_ids"] == loaded.layout.image_token_id
  with steering(loaded, sae, [Edit(5, 2.0)], mode="add", positions="image"), \
       steering(loaded, sae, [Edit(6, -1.0)], mode="add", positions="text"):
    both = residual(loaded, inputs)
  torch.testing.assert_close(both[image] - x[image],
                             (2.0 * sae.W_dec[5]).expand(int(image.sum()), -1))
  torch.testing.assert_close(both[text] - x[text], (-sae.W_dec[6]).expand(int(text.sum()), -1))


@torch.no_grad()
def test_replace_mode_is_the_reconstruction_with_clamped_pre_activations(setup):
  loaded, sae = setup
  inputs = batch(loaded)
  x = residual(loaded, inputs)
  real = inputs["attention_mask"].bool()
  with steering(loaded, sae, [], mode="replace", positions="prompt"):
    edited = residual(loaded, inputs)
  torch.testing.assert_close(edited[real], sae(x[real]), rtol=1e-5, atol=1e-5)
  assert torch.equal(edited[~real], x[~real])  # padding untouched
  with steering(loaded, sae, [Edit(ALWAYS_ON, 9.0)], mode="replace", positions="prompt"):
    clamped = residual(loaded, inputs)
  pre = sae.pre_activations(x[real])
  pre[:, ALWAYS_ON] = 9.0
  torch.testing.assert_close(clamped[real], sae.decode(*torch.topk(pre, sae.k, dim=-1)),
                             rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_adding_an_unembedding_direction_makes_that_token_generated(setup, tmp_path):
  loaded, _ = setup
  token = 77
  params = steer_fixtures.random_params(loaded.d_model)
  direction = loaded.model.get_output_embeddings().weight[token].numpy()
  params["W_dec"][0] = direction / (direction ** 2).sum() ** 0.5
  sae = SAE.from_export(steer_fixtures.write_export(tmp_path, params))
  inputs = batch(loaded)
  plain = loaded.model.generate(**inputs, max_new_tokens=4, do_sample=False)
  new = slice(inputs["input_ids"].shape[1], None)
  assert not (plain[:, new] == token).all()
  with steering(loaded, sae, [Edit(0, 100.0)], mode="add", positions="all") as steer:
    steered = loaded.model.generate(**inputs, max_new_tokens=4, do_sample=False)
  assert (steered[:, new] == token).all()
  real_prompt = int(inputs["attention_mask"].sum())
  assert steer.edited_positions == real_prompt + 2 * 3  # prefill + 3 one-token decode steps per row

  # Only at generated tokens: the first new token (from the prefill) is the plain one.
  with steering(loaded, sae, [Edit(0, 100.0)], mode="add", positions="generated"):
    late = loaded.model.generate(**inputs, max_new_tokens=4, do_sample=False)
  assert torch.equal(late[:, new][:, 0], plain[:, new][:, 0])
  assert (late[:, new][:, 1:] == token).all()


@torch.no_grad()
def test_padded_batch_matches_each_row_alone(setup):
  loaded, sae = setup
  prompts, seeds = PROMPTS, (0, 5)
  inputs = batch(loaded, prompts, seeds)
  assert not inputs["attention_mask"].all()  # there is padding

  def run(inputs):
    with steering(loaded, sae, [Edit(ALWAYS_ON, 40.0), Edit(9, 3.0)], positions="all"):
      return loaded.model.generate(**inputs, max_new_tokens=3, do_sample=False,
                                   output_scores=True, return_dict_in_generate=True)

  together = run(inputs)
  length = inputs["input_ids"].shape[1]
  for row, (prompt, seed) in enumerate(zip(prompts, seeds)):
    alone_inputs = batch(loaded, (prompt,), (seed,))
    alone = run(alone_inputs)
    assert torch.equal(together.sequences[row, length:],
                       alone.sequences[0, alone_inputs["input_ids"].shape[1]:])
    for score_together, score_alone in zip(together.scores, alone.scores):
      torch.testing.assert_close(score_together[row], score_alone[0], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_leaving_the_context_restores_the_model_bit_for_bit(setup):
  loaded, sae = setup
  inputs = batch(loaded)
  before = logits(loaded, inputs)
  with steering(loaded, sae, [Edit(ALWAYS_ON, 50.0)], positions="all"):
    assert not torch.equal(logits(loaded, inputs), before)
  with steering(loaded, sae, [Edit(ALWAYS_ON, 50.0)], mode="replace", positions="all"):
    loaded.model.generate(**inputs, max_new_tokens=2, do_sample=False)
  assert torch.equal(logits(loaded, inputs), before)


@torch.no_grad()
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_model(dtype, tiny_model, tmp_path):
  loaded = llava.load_llava(str(tiny_model("llava_next")), dtype, "cpu")
  sae = SAE.from_export(steer_fixtures.write_export(tmp_path, steer_fixtures.random_params(
      loaded.d_model, always_on=ALWAYS_ON)))
  inputs = llava.to_model_inputs(loaded, batch(loaded))
  clean = logits(loaded, inputs)
  x = residual(loaded, inputs)
  assert x.dtype == llava.TORCH_DTYPES[dtype]
  # The SAE runs in float32; a zero edit casts back to the very same half-precision values.
  current = sae.encode(x.float())[0][..., 0]  # the always-on latent is the largest everywhere
  with steering(loaded, sae, [Edit(ALWAYS_ON, 0.0)], mode="add", positions="all"):
    assert torch.equal(logits(loaded, inputs), clean)
  with steering(loaded, sae, [Edit(ALWAYS_ON, 30.0)], positions="image"):
    edited = residual(loaded, inputs)
    out = loaded.model.generate(**inputs, max_new_tokens=2, do_sample=False)
  assert edited.dtype == x.dtype and out.shape[1] == inputs["input_ids"].shape[1] + 2
  image = inputs["input_ids"] == loaded.layout.image_token_id
  moved = (edited.float() - x.float())[image] @ sae.W_dec[ALWAYS_ON]
  torch.testing.assert_close(moved, 30.0 - current[image], rtol=0.05, atol=0.2)


def test_errors_and_configs(setup, tmp_path):
  loaded, sae = setup
  with pytest.raises(SteeringError, match="latent 999"):
    steering(loaded, sae, [Edit(999, 1.0)])
  with pytest.raises(SteeringError, match="positions"):
    steering(loaded, sae, [Edit(1, 1.0)], positions="nowhere")
  with pytest.raises(hooks.HookError, match="layer 9"):
    steering(loaded, sae, [Edit(1, 1.0)], layer=9)
  renamed = tmp_path / "my_sae"  # the export's metadata, not its folder name, gives the layer
  steer_fixtures.write_export(tmp_path, steer_fixtures.random_params(loaded.d_model)).rename(renamed)
  (renamed / dictionary.SIDECAR).write_text(
      json.dumps({"source": {"hookpoint": steer_fixtures.HOOKPOINT}}))
  assert load_sae(loaded, str(renamed), -1)[1] == 0
  with pytest.raises(SteeringError, match=r"--layer=1, but .*\(layer 0\)"):
    load_sae(loaded, str(renamed), 1)
  assert layer_of_hookpoint("model.layers.24") == 24
  assert layer_of_hookpoint("model.language_model.layers.3") == 3
  with pytest.raises(SteeringError, match="--layer"):
    layer_of_hookpoint("blocks.3.hook_resid_post")
  assert edit_configs([1, 2], "clamp", [5.0, 6.0], None) == [
      ("1=5,2=6", [Edit(1, 5.0), Edit(2, 6.0)])]
  assert [label for label, _ in edit_configs([1], "add", None, [2.0, 4.0])] == ["2", "4"]
  assert edit_configs([1], "ablate", None, None) == [("1=0", [Edit(1, 0.0)])]
  assert edit_configs([], "replace", None, None) == [("reconstruction", [])]
  with pytest.raises(SteeringError, match="--values has 1"):
    edit_configs([1, 2], "clamp", [5.0], None)


def test_steer_command(tiny_model, synthetic_images, tmp_path):
  export = steer_fixtures.write_export(tmp_path / "sae", steer_fixtures.random_params(64))
  image = sorted(synthetic_images.iterdir())[0]
  proc = subprocess.run(
      [sys.executable, "-m", "interpret.steer", f"--model={tiny_model('llava_next')}",
       f"--sae={export}", "--prompt=Describe the image.", "--dtype=float32", f"--image={image}",
       "--latents=1,2", "--mode=add", "--strengths=0,80", "--max_new_tokens=4",
       f"--out={tmp_path / 'steer.json'}"], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  assert summary == {"ok": True, "out": str(tmp_path / "steer.json"), "layer": 0, "runs": 2,
                     "changed": 1}
  result = json.loads((tmp_path / "steer.json").read_text())
  assert [r["label"] for r in result["runs"]] == ["0", "80"]
  assert result["runs"][0]["text"] == result["baseline"] != result["runs"][1]["text"]
  assert result["runs"][1]["edits"] == [{"latent": 1, "value": 80.0}, {"latent": 2, "value": 80.0}]
