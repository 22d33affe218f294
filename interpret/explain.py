"""`python -m interpret.explain`: ask a multimodal model to explain each latent from its top images.

  python -m interpret.explain --topacts=TOPACTS --explainer=openai:http://localhost:8000/v1 \
      --explainer_model=llava-hf/llava-onevision-qwen2-72b-ov-hf --out=EXPLANATIONS
  python -m interpret.explain --topacts=TOPACTS --explainer=hf:/models/llava-ov-7b --out=...

Each latent's top `--num_images` images are shown with the regions where it is inactive darkened
(the paper's visual prompt). Kill it at any time and rerun the same command: finished latents are
never asked again (see interpret/jobs.py for the files written to --out). With --text_contexts,
latents whose scan modality profile is text-dominant (text share >= image share) also get their top
text contexts in the prompt (firing token in [[brackets]], decoded with --tokenizer, default the
store's model), and text-only latents, which have no top image, are explained from them alone.

At scale:
  --explainer=openai:URL1,openai:URL2,...   one model on several servers; each request goes to the
      one with the fewest in flight; a server that dies is left out and the others go on.
  --batch_file=IN.jsonl --batch_output=OUT.jsonl --explainer_model=M   no server: write the
      requests of the unfinished latents to IN (OpenAI Batch API / `vllm run-batch` input); after
      the batch ran, the same command reads OUT into explanations.jsonl and writes IN again with
      what is left (failed lines name their latent and error).
  --num_workers=N --worker_index=I (or a SLURM array)   each job explains every N-th selected
      latent into OUT/parts/; the last to finish merges them into OUT/explanations.jsonl.

Exit status: 0 when every selected latent is finished (with workers: this worker's), 2 when some
failed or wait in a batch file (rerun to retry them), 1 on bad input.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import sys
from pathlib import Path

from absl import flags

from harvest import workers
from interpret import batchfile, explainers, jobs, llm_flags, prompts, sources, textctx
from interpret import topacts as topacts_lib
from sae_jax import cli
from sae_jax.store import StoreError
from sae_jax.files import atomic_write_json

_BEFORE = set(flags.FLAGS)

_TOPACTS = flags.DEFINE_string("topacts", None, "TOPACTS folder (sae_jax.scan output).", required=True)
_STORE = flags.DEFINE_string("store", None, "Activation store whose image table names the images "
                             "(default: the copy in TOPACTS/images.jsonl).")
_IMAGE_ROOT = flags.DEFINE_string("image_root", None, "Folder that relative image paths of the "
                                  "image table are relative to (default: tried from here, the "
                                  "store and TOPACTS).")
_EXPLAINER = llm_flags.define_endpoint(
    "explainer", "openai:http://HOST:PORT/v1 (vLLM, SGLang or any OpenAI-compatible server), "
    "several such separated by commas (one model on several servers), or hf:PATH (a local "
    "transformers image-text model). Not with --batch_file.",
    model_help="(default: the first model it lists; required with --batch_file)")
_REQUESTS = llm_flags.define_requests("explanation", timeout_s=600.0, max_tokens=300)
flags.adopt_module_key_flags(llm_flags)  # so that --help lists them as this command's
_BATCH_FILE = flags.DEFINE_string(
    "batch_file", None, "Instead of asking a server, write every unfinished latent's request to "
    "this OpenAI batch input file (the Batch API's and `vllm run-batch`'s format).")
_BATCH_OUTPUT = flags.DEFINE_string(
    "batch_output", None, "With --batch_file: first read this batch output file, if it exists, "
    "into explanations.jsonl (then --batch_file holds only the latents still unfinished).")
_NUM_WORKERS = flags.DEFINE_integer(
    "num_workers", 0, "Jobs sharing the latents (each with its --worker_index and the same "
    "--out); default: from SLURM_ARRAY_TASK_ID/COUNT, RANK/WORLD_SIZE or SLURM_PROCID/NTASKS, "
    "else 1.", lower_bound=0)
_WORKER_INDEX = flags.DEFINE_integer("worker_index", -1, "This job's index among --num_workers.")
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
_BACKOFF_S = flags.DEFINE_float("backoff_s", 1.0, "First retry delay; doubles per retry (max 60 s).")
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


def _worker_path(path: str, index: int, count: int) -> Path:
  """Each worker's own batch file: NAME.worker<i>-of-<n>.jsonl for NAME.jsonl."""
  path = Path(path)
  if count == 1:
    return path
  return path.with_name(f"{path.stem}.worker{index}-of-{count}{path.suffix}")


def _batch_job(topacts, table, latents, template, settings, results, index, count) -> dict:
  """Reads the batch output back, then writes the input file of the latents still unfinished."""
  model = _EXPLAINER.model.value
  results.parent.mkdir(parents=True, exist_ok=True)
  log = jobs.ResultsLog(results)
  summary = {"latents": len(latents)}
  if _BATCH_OUTPUT.value and (output := _worker_path(_BATCH_OUTPUT.value, index, count)).exists():

    def start(latent):
      record = jobs.new_record(latent, topacts, settings, model)
      return record, template.render([], num_images=len(record["images"])).answer_prefix

    summary["read"] = dict(sorted(batchfile.read_output(output, latents, log, start).items()))
  done = log.finished()
  todo = [i for i in latents if i not in done]

  def request(latent):
    prompt, _ = jobs.latent_prompt(latent, topacts, table, template, settings, model)
    return explainers.chat_body(prompt, model, max_tokens=_REQUESTS.max_tokens.value,
                                temperature=_TEMPERATURE.value, multi_images=_MULTI_IMAGES.value)

  batch_file = _worker_path(_BATCH_FILE.value, index, count)
  left_out = batchfile.write_input(batch_file, todo, request, settings.concurrency)
  for latent, error in left_out:
    log.append({**jobs.new_record(latent, topacts, settings, model), "status": prompts.FAILED,
                "error": error})
  log.close()
  statuses = collections.Counter(log.records[i]["status"] for i in latents if i in log.records)
  summary.update(already_finished=len(latents) - len(todo), batch_file=str(batch_file),
                 requests_written=len(todo) - len(left_out),
                 by_status=dict(sorted(statuses.items())))
  return summary


def main():
  out = Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  if bool(_EXPLAINER.spec.value) == bool(_BATCH_FILE.value):
    raise explainers.ExplainerError("pass either --explainer (ask servers now) or --batch_file "
                                    "(write a batch input file)")
  if _BATCH_FILE.value and not _EXPLAINER.model.value:
    raise explainers.ExplainerError("--batch_file needs --explainer_model (the model each "
                                    "request names)")
  if _BATCH_OUTPUT.value and not _BATCH_FILE.value:
    raise explainers.ExplainerError("--batch_output goes with --batch_file")
  index, count = workers.resolve(_NUM_WORKERS.value, _WORKER_INDEX.value, os.environ)
  # Resolved flags, for the record. The key itself is never a flag: only the variable's name is here.
  atomic_write_json(out / ("flags.json" if count == 1 else f"flags.worker{index}-of-{count}.json"),
                    {name: flags.FLAGS[name].value for name in _OURS})
  topacts = topacts_lib.TopActs(_TOPACTS.value)
  with_text = _TEXT_CONTEXTS.value and topacts.has_text()
  latents, skipped = topacts_lib.selection_from_flags(topacts, flags.FLAGS, with_text=with_text)
  table = sources.open_table(topacts, _STORE.value, _IMAGE_ROOT.value)
  template = prompts.load_template(_PROMPT_TEMPLATE.value)
  if _ANSWER_PREFIX.value is not None:
    template = dataclasses.replace(template, assistant=_ANSWER_PREFIX.value)
  settings = jobs.JobSettings(concurrency=_REQUESTS.concurrency.value, max_retries=_REQUESTS.max_retries.value,
                              backoff_s=_BACKOFF_S.value, num_images=_NUM_IMAGES.value,
                              image_size=_IMAGE_SIZE.value, grid=_GRID.value,
                              text_contexts=textctx.prompt_lines_for(
                                  topacts, textctx.load_tokenizer(textctx.tokenizer_path(
                                      topacts, _TOKENIZER.value)), _TEXT_WINDOW.value,
                                  _NUM_TEXTS.value) if with_text else None)
  mine, results = jobs.worker_latents(latents, index, count), jobs.worker_results(out, index, count)
  if _BATCH_FILE.value:
    model = _EXPLAINER.model.value
    summary = _batch_job(topacts, table, mine, template, settings, results, index, count)
    unfinished = len(mine) - sum(summary["by_status"].get(s, 0) for s in jobs.FINISHED)
  else:
    explainer = _EXPLAINER.client(
        timeout_s=_REQUESTS.timeout_s.value, max_tokens=_REQUESTS.max_tokens.value,
        temperature=_TEMPERATURE.value, multi_images=_MULTI_IMAGES.value, device=_HF_DEVICE.value,
        dtype=_HF_DTYPE.value)
    model = explainer.name
    summary = jobs.run(topacts, table, mine, template, explainer, out, settings, results)
    # Failed latents (retries exhausted, unreadable images) are retried by the next run.
    unfinished = summary["by_status"].get(prompts.FAILED, 0)
    if isinstance(explainer, explainers.EndpointPool):
      summary["answered_by"] = explainer.answered
  if count > 1:
    summary.update(worker_index=index, num_workers=count)
    # Whichever worker finishes last writes out/explanations.jsonl (rerun any one to retry).
    summary["merge_waits_for"] = jobs.merge_workers(out, latents, count)
  if _TEXT_CONTEXTS.value and not with_text:
    summary["text_contexts"] = ("not used: the scan recorded no text rows (an older scan, or a "
                                "store without text tokens)")
  print(json.dumps({"ok": not unfinished, "model": model, "skipped_no_images": skipped,
                    **summary, "out": str(out)}))
  # An unfinished job says so in its exit status, so that scripts notice.
  sys.exit(2 if unfinished else 0)


if __name__ == "__main__":
  cli.run(main, (topacts_lib.TopActsError, StoreError, prompts.TemplateError, jobs.ResultsError,
                 explainers.ExplainerError, textctx.TextContextError, workers.WorkerError))
