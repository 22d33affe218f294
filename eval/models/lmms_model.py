"""lmms-eval model `llava_sae`: a Hugging Face LLaVA (1.5, NeXT, OneVision) steered by an SAE.

  python -m lmms_eval --model llava_sae --tasks pope,mme --batch_size 8 \
      --model_args pretrained=llava-hf/llava-1.5-7b-hf,sae=EXPORT/model.layers.24,latents=36992,mode=clamp,strength=40

lmms-eval's own `llava_hf` model loads the checkpoint and builds each prompt (the chat messages of
the task, the processor's chat template); this one adds, for the whole run, the steering hooks of
interpret/steering.py (the SAE error kept in clamp, add and ablate) and generates a batch of
prompts at once (left-padded; llava_hf takes one at a time). Without latents no hook is installed
and it answers as llava_hf does.

Model args besides llava_hf's (pretrained, device, dtype, ...):
  sae        EXPORT/<hookpoint> (sparsify or SAELens layout); the layer is the hookpoint's
  layer      decoder layer, when the hookpoint name does not tell it
  latents    latent indices, separated by ';' (model_args are separated by ','), e.g. 12;40
  mode       clamp | add | add_scaled | ablate | replace
  strength   one value for every latent; or values=V1;V2 (one per latent)
  positions  image | text | prompt | generated | all (default all)

lmms-eval finds the model through the `lmms_eval.models` entry point of the `lmms` extra
(eval/lmms_manifest.py).
"""

from __future__ import annotations

import json

import torch
from lmms_eval.api.instance import GenerationResult, TokenCounts
from lmms_eval.models.chat.llava_hf import LlavaHf
from lmms_eval.protocol import ChatMessages

from interpret import steering
from interpret.sae import SAE
from sae_jax.formats import dictionary


def _numbers(name: str, value, kind: type) -> list:
  """A model arg holding numbers separated by ';' (lmms-eval turns a lone number into one)."""
  if value is None or value == "":
    return []
  parts = str(value).strip("'\"").replace(",", ";").split(";")
  try:
    return [kind(p) for p in parts if p.strip()]
  except ValueError:
    raise steering.SteeringError(f"llava_sae {name}={value}: expected {kind.__name__} values "
                                 "separated by ';'") from None


class LlavaSae(LlavaHf):
  is_simple = False

  def __init__(self, sae: str | None = None, latents="", mode: str = "clamp", strength=None,
               values="", positions: str = "all", layer: int = -1, batch_size: int = 1,
               **llava_hf_args):
    super().__init__(batch_size=batch_size, **llava_hf_args)
    chosen = _numbers("latents", latents, int)
    self.steering = None
    if not chosen and not (mode == "replace" and sae):  # replace alone: reconstruction only
      return  # no hook at all: llava_hf's answers
    if not sae:
      raise steering.SteeringError("llava_sae: latents need sae=EXPORT/<hookpoint>")
    strengths = _numbers("strength", strength, float)
    [(_, edits)] = steering.edit_configs(
        chosen, mode, _numbers("values", values, float), strengths)
    try:
      model_sae = SAE.from_export(sae, dtype=torch.float32, device=self.device)
    except (dictionary.DictionaryError, OSError) as e:
      raise steering.SteeringError(f"llava_sae sae={sae}: {e}") from e
    width = self.model.config.text_config.hidden_size
    if model_sae.d_in != width:
      raise steering.SteeringError(f"llava_sae sae={sae} reads vectors of width "
                                   f"{model_sae.d_in}; the model's residual stream has {width}")
    if layer < 0:
      layer = steering.layer_of_hookpoint(model_sae.info["hookpoint"])
    # Open for the model's lifetime: every generate of the run is steered.
    self.steering = steering.Steering(
        self.model, model_sae, layer, edits, mode=mode, positions=positions,
        image_token_id=self.model.config.image_token_id, bos_token_id=self.tokenizer.bos_token_id)
    self.steering.__enter__()

  def _prompt(self, request) -> tuple[str, list]:
    """The chat-templated text and the images of one request, as llava_hf builds them."""
    _, doc_to_messages, _, doc_id, task, split = request.args
    messages = ChatMessages(messages=doc_to_messages(self.task_dict[task][split][doc_id]))
    images, videos, _ = messages.extract_media()
    if videos:
      raise ValueError(f"llava_sae: task {task} shows videos; only images are supported")
    text = self._image_processor.apply_chat_template(
        messages.model_dump()["messages"], tokenize=False, add_generation_prompt=True)
    return text, images

  @torch.inference_mode()
  def _generate(self, requests, gen_kwargs: dict) -> list[GenerationResult]:
    prompts = [self._prompt(r) for r in requests]
    images = [image for _, shown in prompts for image in shown]
    inputs = self._image_processor(
        images=images or None, text=[text for text, _ in prompts], return_tensors="pt",
        padding=True, padding_side="left").to(self.device, self.model.dtype)
    # llava_hf's defaults, so that an unsteered run answers as it does.
    sample = gen_kwargs.get("temperature", 0) > 0
    out = self.model.generate(
        **inputs, do_sample=sample, temperature=gen_kwargs["temperature"] if sample else None,
        top_p=gen_kwargs.get("top_p"), num_beams=gen_kwargs.get("num_beams", 1),
        max_new_tokens=gen_kwargs.get("max_new_tokens", 1024), use_cache=self.use_cache,
        pad_token_id=self.eot_token_id, eos_token_id=self.eot_token_id)
    new_tokens = out[:, inputs["input_ids"].shape[1]:]
    texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    lengths = (new_tokens != self.eot_token_id).sum(1).tolist()
    for (prompt, _), text in zip(prompts, texts):
      self.cache_hook.add_partial("generate_until", (prompt, gen_kwargs), text)
    return [GenerationResult(text=t, token_counts=TokenCounts(output_tokens=n))
            for t, n in zip(texts, lengths)]

  def generate_until(self, requests) -> list[GenerationResult]:
    """Batches of --batch_size requests with the same generation settings, answers in order."""
    groups: dict[str, list[int]] = {}
    for i, request in enumerate(requests):
      groups.setdefault(json.dumps(request.args[2], sort_keys=True, default=str), []).append(i)
    answers: list[GenerationResult | None] = [None] * len(requests)
    for indices in groups.values():
      for start in range(0, len(indices), self.batch_size):
        chunk = indices[start:start + self.batch_size]
        results = self._generate([requests[i] for i in chunk], dict(requests[chunk[0]].args[2]))
        for i, result in zip(chunk, results):
          answers[i] = result
    return answers
