"""Explanation requests as an OpenAI batch file, and the batch's output read back.

The input file is what the OpenAI Batch API and `vllm run-batch -i IN -o OUT --model M` read: one
JSON line per latent, {"custom_id": "latent-<i>", "method": "POST", "url": "/v1/chat/completions",
"body": <the chat-completions request interpret.explain would send>}. Their output file has one
line per request, {"custom_id", "response": {"status_code", "body": <chat completion>}, "error"},
in any order. Reading it appends one explanations.jsonl record per latent (see interpret/jobs.py),
a failed one naming the output line and the error; finished latents are never written again.
"""

from __future__ import annotations

import collections
import concurrent.futures as futures
import json
import os
from pathlib import Path

from harvest.images import BadImage
from interpret import explainers, jobs, prompts

URL = "/v1/chat/completions"
_PREFIX = "latent-"


def custom_id(latent: int) -> str:
  return f"{_PREFIX}{latent}"


def _latent_of(row, where: str) -> int:
  name = row.get("custom_id") if isinstance(row, dict) else None
  number = name[len(_PREFIX):] if isinstance(name, str) and name.startswith(_PREFIX) else ""
  if not number.isdigit():
    raise jobs.ResultsError(f"{where}: expected an object with a custom_id 'latent-<n>', got "
                            f"{json.dumps(row)[:120]}")
  return int(number)


def _error_of(row: dict) -> str | None:
  """Why a batch output line holds no answer; None when it holds one."""
  if row.get("error"):
    return f"error {json.dumps(row['error'])[:300]}"
  response = row.get("response")
  if not isinstance(response, dict):
    return "no response"
  if response.get("status_code") != 200:
    return f"HTTP {response.get('status_code')} {json.dumps(response.get('body'))[:300]}"
  return None


def read_output(path: Path, wanted: list[int], log: jobs.ResultsLog, start) -> collections.Counter:
  """Appends to `log` a record for each latent of `wanted` not finished there that has a line in
  the batch output `path`; start(latent) -> (the start of its record, its prompt's answer prefix).
  Returns counts by status (and "not_selected": lines about latents outside `wanted`)."""
  wanted, done = set(wanted), log.finished()
  counts = collections.Counter()
  for line_no, row in jobs.read_jsonl(path):
    where = f"{path}:{line_no}"
    latent = _latent_of(row, where)
    if latent not in wanted:
      counts["not_selected"] += 1
      continue
    if latent in done:
      continue
    record, answer_prefix = start(latent)
    record.update(attempts=1, batch_output=where)
    error = _error_of(row)
    if error is None:
      try:
        raw = explainers.reply_text(row["response"].get("body"), answer_prefix, where)
      except explainers.ExplainerError as e:
        error = str(e)
    if error is None:
      record = jobs.answered_record(record, raw)
    else:
      record.update(status=prompts.FAILED, error=f"{where}: {error}")
    log.append(record)
    done.add(latent)
    counts[record["status"]] += 1
  return counts


def write_input(path: Path, latents: list[int], request, threads: int) -> list[tuple[int, str]]:
  """Writes the batch input file of `latents` (request(latent) -> chat body, or BadImage), whole
  or not at all; returns the (latent, error) of those left out."""
  left_out = []
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "w") as f, futures.ThreadPoolExecutor(threads) as pool:

    def build(latent):
      try:
        return latent, request(latent), None
      except BadImage as e:
        return latent, None, str(e)

    # in the order of `latents`, each line written as soon as its turn comes
    for latent, body, error in pool.map(build, latents):
      if error:
        left_out.append((latent, error))
        continue
      f.write(json.dumps({"custom_id": custom_id(latent), "method": "POST", "url": URL,
                          "body": body}) + "\n")
  os.replace(tmp, path)
  return left_out
