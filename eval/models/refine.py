"""Label refinement: a text model rewrites each explanation into a short concept label for CLIP.

The paper rewrites explanations with Llama-3.1 and a few-shot prompt before CLIP-scoring, because
CLIP reads at most 77 tokens and scores short captions best. The prompt is a template file
(eval/templates/refine_label.txt, same [system]/[user] layout as interpret.explain's); the client is
one of interpret.explain's backends (openai:URL or hf:PATH), with its retries and response cache.

OUT/labels.jsonl gets one line per latent: {"latent", "status": ok|parse_error|failed,
"explanation", "label", "raw", "model", "attempts", "cached", "error"}. A latent whose last line is
finished (ok or parse_error) for the same explanation is never asked again; failed ones are retried
by the next run, and a changed explanation is refined anew.

`--refine_template=paper:CLONE` uses the paper's own prompt (`LabelRefiner.PROMPT`), read from a
local clone of EvolvingLMMs-Lab/multimodal-sae (nothing of theirs is stored here) and sent as the only
message, as their client sends it (an empty system message: Llama-3.1's chat template renders the
same system block with or without one). Its answer is parsed as ours ([ANSWER] line), not by their
parser (which keeps everything after the first [ANSWER]); labels.jsonl keeps the raw answer.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from interpret import jobs, prompts
from interpret.explainers import ExplainerError

DEFAULT_TEMPLATE = Path(__file__).parents[1] / "templates" / "refine_label.txt"
PAPER_PREFIX = "paper:"
PAPER_REFINER = Path("sae_auto_interp/agents/scorers/segment/label_refiner.py")
# The last "[ANSWER] label" (or "[ANSWER]: label") line; tolerant of markdown bold and quotes.
_ANSWER = re.compile(r"\[ANSWER\]\**\s*:?\s*\**\s*(.*)")


def parse_label(text: str) -> tuple[str, str | None]:
  """(status, label): ok with the label, or parse_error with None."""
  matches = _ANSWER.findall(text or "")
  label = matches[-1].strip().strip("*\"'").strip() if matches else ""
  return (prompts.OK, label) if label else (prompts.PARSE_ERROR, None)


def paper_template(clone: str | Path) -> prompts.Template:
  """The paper's LabelRefiner.PROMPT from a clone (read as text, never imported), {description}
  becoming our {explanation}."""
  path = Path(clone) / PAPER_REFINER
  try:
    tree = ast.parse(path.read_text())
  except (OSError, SyntaxError) as e:
    raise prompts.TemplateError(f"--refine_template={PAPER_PREFIX}{clone}: cannot read {path} "
                                f"({e})") from e
  for node in tree.body:
    if (isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["PROMPT"]
        and isinstance(node.value, ast.Constant) and "{description}" in str(node.value.value)):
      return prompts.Template(system="", user=node.value.value.replace("{description}",
                                                                       "{explanation}"))
  raise prompts.TemplateError(f"--refine_template={PAPER_PREFIX}{clone}: {path} has no PROMPT "
                              "string with {description}")


def load_template(spec: str | None) -> prompts.Template:
  """Our template file (default: DEFAULT_TEMPLATE), another file, or paper:CLONE."""
  if spec and spec.startswith(PAPER_PREFIX):
    return paper_template(spec[len(PAPER_PREFIX):])
  return prompts.load_template(spec or DEFAULT_TEMPLATE)


def render(template: prompts.Template, explanation: str) -> prompts.Prompt:
  fill = lambda text: text.replace("{explanation}", explanation)
  return prompts.Prompt(fill(template.system), fill(template.user), ())


def _refine_one(latent, explanation, template, client, cache, settings, counters) -> dict:
  record = {"latent": latent, "explanation": explanation, "model": client.name, "label": None,
            "raw": None, "attempts": 0, "cached": False, "error": None}
  prompt = render(template, explanation)
  key = jobs.ResponseCache.key(client.identity, prompt)
  raw = cache.get(key)
  if raw is None:
    try:
      raw, record["attempts"] = jobs.with_retries(lambda: client.complete(prompt), settings,
                                                   counters)
    except ExplainerError as e:
      if e.fatal:
        raise  # no request can succeed: stop
      record.update(status=prompts.FAILED, error=str(e))
      return record
    cache.put(key, raw)
  else:
    record["cached"] = True
    counters.add("cache_hits")
  status, label = parse_label(raw)
  record.update(status=status, label=label, raw=raw)
  return record


def refine(explanations: dict[int, str], template: prompts.Template, client, out: Path,
           settings: jobs.JobSettings) -> tuple[dict[int, dict], dict]:
  """Labels the latents of `explanations` ({latent: explanation}) not finished in
  out/labels.jsonl; returns every latent's latest record and the counts of this run."""
  out.mkdir(parents=True, exist_ok=True)
  log, cache = jobs.ResultsLog(out / "labels.jsonl"), jobs.ResponseCache(out / "refine_cache")
  counters = jobs.Counters()
  finished = log.finished()
  todo = [i for i, text in explanations.items()
          if not (i in finished and log.records[i].get("explanation") == text)]
  statuses = jobs.run_bounded(
      todo, lambda i: _refine_one(i, explanations[i], template, client, cache, settings, counters),
      log, settings.concurrency, "refine")
  records = {i: log.records[i] for i in explanations if i in log.records}
  return records, {"refined": len(todo), "already_finished": len(explanations) - len(todo),
                   "by_status": dict(sorted(statuses.items())),
                   "requests": counters.values["requests"], "retries": counters.values["retries"],
                   "cache_hits": counters.values["cache_hits"]}
