"""`python -m interpret.explain`: ask a multimodal model to explain each latent from its top images.

  python -m interpret.explain --topacts=TOPACTS --explainer=openai:http://localhost:8000/v1 \
      --explainer_model=llava-hf/llava-onevision-qwen2-72b-ov-hf --out=EXPLANATIONS
  python -m interpret.explain --topacts=TOPACTS --explainer=hf:/models/llava-ov-7b --out=...

Each latent's top `--num_images` images are shown with the regions where it is inactive darkened
(the paper's visual prompt). Kill it at any time and rerun the same command: finished latents are
never asked again (see interpret/jobs.py for the files written to --out). With --text_contexts,
latents whose scan modality profile is text-dominant (text share >= image share) also get their top
text contexts in the prompt (firing token in [[brackets]], decoded with --tokenizer, default the
store's model), and text-only latents, which have no top image, are explained from them alone. Exit status: 0 when every
selected latent is finished, 2 when some failed (rerun to retry them), 1 on bad input.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

from absl import flags

from interpret import explainers, jobs, prompts, sources, textctx
from interpret import topacts as topacts_lib
from sae_jax import cli
from sae_jax.store import StoreError, atomic_write_json

_BEFORE = set(flags.FLAGS)

_TOPACTS = flags.DEFINE_string("topacts", None, "TOPACTS folder (sae_jax.scan output).", required=True)
_STORE = flags.DEFINE_string("store", None, "Activation store whose image table names the images "
                             "(default: the copy in TOPACTS/images.jsonl).")
_IMAGE_ROOT = flags.DEFINE_string("image_root", None, "Folder that relative image paths of the "
                                  "image table are relative to (default: tried from here, the "
                                  "store and TOPACTS).")
_EXPLAINER = flags.DEFINE_string("explainer", None, "openai:http://HOST:PORT/v1 (vLLM, SGLang or "
                                 "any OpenAI-compatible server) or hf:PATH (a local transformers "
                                 "image-text model).", required=True)
_EXPLAINER_MODEL = flags.DEFINE_string("explainer_model", None, "Model name sent to the OpenAI "
                                       "server (default: the first model it lists).")
_API_KEY_ENV = flags.DEFINE_string("api_key_env", "OPENAI_API_KEY", "Environment variable holding "
                                   "the API key (unset: no Authorization header).")
_OUT = flags.DEFINE_string("out", None, "Output folder: explanations.jsonl, cache/, flags.json.",
                           required=True)
_PROMPT_TEMPLATE = flags.DEFINE_string("prompt_template", None, "Prompt template file (default: "
                                       "interpret/templates/explain.txt).")
_ANSWER_PREFIX = flags.DEFINE_string(
    "answer_prefix", None, "Start of the answer, for the model to continue (e.g. "
    "'[EXPLANATION]:'): overrides the template's [assistant] section. Keeps small explainers on "
    "format; skips the reasoning a large one writes first.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 5, "Top images shown per latent (the paper: 5).",
                                   lower_bound=1)
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 336, "Side in pixels of each image sent.",
                                   lower_bound=16)
_GRID = flags.DEFINE_boolean("grid", False, "Send the images tiled in one grid instead of "
                             "separately (fewer image tokens on explainers that expand each image).")
_CONCURRENCY = flags.DEFINE_integer("concurrency", 16, "Requests in flight.", lower_bound=1)
_MAX_RETRIES = flags.DEFINE_integer("max_retries", 4, "Retries per request on timeouts, "
                                    "connection errors, 429 and 5xx.", lower_bound=0)
_TIMEOUT_S = flags.DEFINE_float("timeout_s", 600.0, "Timeout of each socket operation of a request.")
_BACKOFF_S = flags.DEFINE_float("backoff_s", 1.0, "First retry delay; doubles per retry (max 60 s).")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 300, "Longest answer, in tokens.", lower_bound=1)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Sampling temperature (0: greedy, as the "
                                  "paper).")
_MULTI_IMAGES = flags.DEFINE_boolean("multi_images", False, "SGLang: tag each image part "
                                     "'modalities: multi-images' (one base view per image on "
                                     "LLaVA-OneVision, as the paper's code).")
_TEXT_CONTEXTS = flags.DEFINE_boolean(
    "text_contexts", False, "Also show text-dominant latents' top text contexts (modality profile "
    "of the scan: text share >= image share), and explain text-only latents from them alone.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Tokenizer decoding the text contexts "
                                 "(default: the scanned store's model).")
_NUM_TEXTS = flags.DEFINE_integer("num_texts", 5, "Top text contexts shown per latent.",
                                  lower_bound=1)
_TEXT_WINDOW = flags.DEFINE_integer("text_window", 8, "Tokens shown either side of a firing text "
                                    "token.", lower_bound=0)
_HF_DEVICE = flags.DEFINE_string("hf_device", "cpu", "Device of an hf: explainer (cpu, cuda, ...).")
_HF_DTYPE = flags.DEFINE_enum("hf_dtype", "auto", ["auto", "float32", "bfloat16", "float16"],
                              "Dtype of an hf: explainer.")

topacts_lib.define_selection_flags(flags)
_OURS = sorted(set(flags.FLAGS) - _BEFORE)


def main():
  out = Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  # Resolved flags, for the record. The key itself is never a flag: only the variable's name is here.
  atomic_write_json(out / "flags.json", {name: flags.FLAGS[name].value for name in _OURS})
  topacts = topacts_lib.TopActs(_TOPACTS.value)
  with_text = _TEXT_CONTEXTS.value and topacts.has_text()
  latents, skipped = topacts_lib.selection_from_flags(topacts, flags.FLAGS, with_text=with_text)
  table = sources.open_table(topacts, _STORE.value, _IMAGE_ROOT.value)
  template = prompts.load_template(_PROMPT_TEMPLATE.value)
  if _ANSWER_PREFIX.value is not None:
    template = dataclasses.replace(template, assistant=_ANSWER_PREFIX.value)
  explainer = explainers.make_explainer(
      _EXPLAINER.value, _EXPLAINER_MODEL.value, os.environ.get(_API_KEY_ENV.value),
      timeout_s=_TIMEOUT_S.value, max_tokens=_MAX_TOKENS.value, temperature=_TEMPERATURE.value,
      multi_images=_MULTI_IMAGES.value, device=_HF_DEVICE.value, dtype=_HF_DTYPE.value)
  settings = jobs.JobSettings(concurrency=_CONCURRENCY.value, max_retries=_MAX_RETRIES.value,
                              backoff_s=_BACKOFF_S.value, num_images=_NUM_IMAGES.value,
                              image_size=_IMAGE_SIZE.value, grid=_GRID.value,
                              text_contexts=textctx.prompt_lines_for(
                                  topacts, textctx.load_tokenizer(textctx.tokenizer_path(
                                      topacts, _TOKENIZER.value)), _TEXT_WINDOW.value,
                                  _NUM_TEXTS.value) if with_text else None)
  summary = jobs.run(topacts, table, latents, template, explainer, out, settings)
  # Failed latents (retries exhausted, unreadable images) are retried by the next run: say so in
  # the exit status, so that scripts notice.
  failed = summary["by_status"].get(prompts.FAILED, 0)
  if _TEXT_CONTEXTS.value and not with_text:
    summary["text_contexts"] = ("not used: the scan recorded no text rows (an older scan, or a "
                                "store without text tokens)")
  print(json.dumps({"ok": not failed, "model": explainer.name, "skipped_no_images": skipped,
                    **summary, "out": str(out)}))
  sys.exit(2 if failed else 0)


if __name__ == "__main__":
  cli.run(main, (topacts_lib.TopActsError, StoreError, prompts.TemplateError, jobs.ResultsError,
                 explainers.ExplainerError, textctx.TextContextError))
