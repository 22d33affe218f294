"""Batch explanation jobs: many requests in flight, retries, a response cache, exact resume.

OUT/explanations.jsonl gets one line per latent as soon as its answer arrives:
  {"latent", "status": ok|unable|parse_error|failed, "explanation", "raw", "model", "images",
   "attempts", "cached", "error"}
A latent whose last line is ok, unable or parse_error is finished and never requested again; a
failed one (retries exhausted, unreadable image) is tried again by the next run. A last line cut
short by kill -9 is dropped on reopening, and its latent asked again; any other bad line stops the
job with its line number. OUT/cache/<sha256>.json holds each answer keyed by the explainer's
identity (model and sampling settings), the prompt text and the image bytes, so a rerun that lost
its explanations.jsonl, or that selects overlapping latents, asks nothing twice.
"""

from __future__ import annotations

import collections
import concurrent.futures as futures
import dataclasses
import hashlib
import json
import random
import threading
import time
from pathlib import Path

from tqdm import tqdm

from harvest.images import BadImage
from interpret import prompts, visual
from interpret.explainers import ExplainerError, TransientError
from sae_jax.files import atomic_write_bytes, atomic_write_json

FINISHED = (prompts.OK, prompts.UNABLE, prompts.PARSE_ERROR)
STATUSES = (*FINISHED, prompts.FAILED)
MAX_BACKOFF_S = 60.0


class ResultsError(ValueError):
  """A JSONL file that cannot be read, or an explanations.jsonl line that is not a record."""


class ResponseCache:
  """One JSON file per answer, named by the sha256 of everything that determines it."""

  def __init__(self, folder: Path):
    self.folder = folder
    folder.mkdir(parents=True, exist_ok=True)

  @staticmethod
  def key(identity: dict, prompt: prompts.Prompt) -> str:
    digest = hashlib.sha256(json.dumps([identity, prompt.system, prompt.user, prompt.answer_prefix],
                                       sort_keys=True).encode())
    for png in prompt.images:
      digest.update(hashlib.sha256(png).digest())
    return digest.hexdigest()

  def get(self, key: str) -> str | None:
    path = self.folder / f"{key}.json"
    try:
      return json.loads(path.read_text())["raw"]
    except (OSError, json.JSONDecodeError, KeyError):
      return None  # absent, or a write cut short: ask again

  def put(self, key: str, raw: str) -> None:
    atomic_write_json(self.folder / f"{key}.json", {"raw": raw})


def _parse_line(line: bytes):
  """The JSON value of one line; a ValueError says why there is none."""
  try:
    return json.loads(line.decode("utf-8"))
  except UnicodeDecodeError as e:
    raise ValueError(f"not UTF-8 ({e.reason} at byte {e.start})") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"not JSON ({e.msg} at column {e.colno})") from None


def read_jsonl(path: Path, repair: bool = False) -> list[tuple[int, object]]:
  """(line number, value) of each non-blank line of a UTF-8 JSONL file, the last one included
  even without its newline. A bad line is a ResultsError naming the file and the line.

  With `repair`, an unterminated last line that does not parse is taken for what a writer killed
  mid-line leaves: it is cut off the file (the job redoes its record), and a complete last line
  gets its newline, so that appending starts on a fresh line.
  """
  try:
    data = path.read_bytes()
  except OSError as e:
    raise ResultsError(f"cannot read {path}: {e.strerror or e}") from e
  lines = data.split(b"\n")  # the last item is b"" when the file ends with a newline
  rows = []
  for line_no, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      rows.append((line_no, _parse_line(line)))
    except ValueError as e:
      cut = line_no == len(lines)  # no newline after it
      if not (repair and cut):
        hint = "; no newline after it: cut short by a killed job? rerun it" if cut else ""
        raise ResultsError(f"{path}:{line_no}: {e}{hint}") from None
      lines.pop()
  if repair and data and not data.endswith(b"\n"):
    atomic_write_bytes(path, b"".join(line + b"\n" for line in lines))
  return rows


def _record_problem(record) -> str | None:
  """Why `record` cannot be an explanation (or eval.models.refine label) record; None when it can."""
  if not isinstance(record, dict):
    return f"expected a JSON object, got {type(record).__name__}"
  for key in ("latent", "status"):
    if key not in record:
      return f'missing key "{key}"'
  if type(record["latent"]) is not int or record["latent"] < 0:
    return f'"latent" must be an integer >= 0, got {record["latent"]!r}'
  if record["status"] not in STATUSES:
    return f"status {record['status']!r} is not one of {', '.join(STATUSES)}"
  for key in ("explanation", "raw"):
    if not isinstance(record.get(key), (str, type(None))):
      return f'"{key}" must be a string or null, got {type(record[key]).__name__}'
  if record["status"] == prompts.OK and not isinstance(record.get("explanation"), str):
    return f'status "{prompts.OK}" needs an "explanation" string'
  return None


def read_explanations(path: Path, repair: bool = False) -> dict[int, dict]:
  """The last record of each latent in an explanations.jsonl, or in the one of an
  interpret.explain --out folder (see read_jsonl for `repair`)."""
  path = path / "explanations.jsonl" if path.is_dir() else path
  records = {}
  for line_no, record in read_jsonl(path, repair):
    problem = _record_problem(record)
    if problem:
      raise ResultsError(f"{path}:{line_no}: {problem}")
    records[record["latent"]] = record
  return records


class ResultsLog:
  """Append-only explanations.jsonl; the last line of a latent wins."""

  def __init__(self, path: Path):
    self.path = path
    self.records = read_explanations(path, repair=True) if path.exists() else {}
    self._file = open(path, "a")

  def finished(self) -> set[int]:
    return {i for i, r in self.records.items() if r["status"] in FINISHED}

  def append(self, record: dict) -> None:
    self._file.write(json.dumps(record, sort_keys=True) + "\n")
    self._file.flush()  # on disk for the next run even if this process is killed right after
    self.records[record["latent"]] = record

  def close(self) -> None:
    self._file.close()


@dataclasses.dataclass
class JobSettings:
  concurrency: int = 16
  max_retries: int = 4
  backoff_s: float = 1.0
  num_images: int = 5
  image_size: int = visual.PROMPT_SIZE
  grid: bool = False  # one collage instead of separate images: fewer image tokens per request
  # latent -> text context lines for the prompt, or None (interpret.explain --text_contexts)
  text_contexts: object = None


class Counters:
  def __init__(self):
    self._lock = threading.Lock()
    self.values = collections.Counter()

  def add(self, name: str, n: int = 1) -> None:
    with self._lock:
      self.values[name] += n


def with_retries(call, settings: JobSettings, counters: Counters):
  """call() with exponential backoff (with jitter) on TransientError; returns (result, attempts)."""
  for attempt in range(settings.max_retries + 1):
    counters.add("requests")
    try:
      return call(), attempt + 1
    except TransientError:
      if attempt == settings.max_retries:
        raise
      counters.add("retries")
      delay = min(settings.backoff_s * 2 ** attempt, MAX_BACKOFF_S)
      time.sleep(delay * random.uniform(0.5, 1.0))


def run_bounded(todo: list[int], work, log: ResultsLog, concurrency: int,
                desc: str) -> collections.Counter:
  """Runs work(i) -> record for each i on `concurrency` threads, appending each record to `log` as
  it finishes; returns the count of each status. A job-fatal ExplainerError stops everything.

  Only a bounded window of latents is submitted at a time, so memory stays O(concurrency).
  """
  statuses = collections.Counter()
  try:
    with futures.ThreadPoolExecutor(concurrency) as pool, \
        tqdm(total=len(todo), unit="latent", desc=desc, dynamic_ncols=True) as bar:
      queue, pending = iter(todo), set()

      def refill():
        while len(pending) < 2 * concurrency and (i := next(queue, None)) is not None:
          pending.add(pool.submit(work, i))

      refill()
      while pending:
        finished, _ = futures.wait(pending, return_when=futures.FIRST_COMPLETED)
        for future in finished:
          pending.remove(future)
          try:
            record = future.result()
          except ExplainerError:
            for other in pending:
              other.cancel()
            raise
          log.append(record)
          statuses[record["status"]] += 1
          bar.update()
        refill()
  finally:
    log.close()
  return statuses


def new_record(latent_index, topacts, settings, model: str) -> dict:
  """The start of a latent's explanations.jsonl record."""
  ids = topacts.latent(latent_index).image_ids[:settings.num_images]
  return {"latent": latent_index, "model": model, "images": [int(i) for i in ids],
          "explanation": None, "raw": None, "attempts": 0, "cached": False, "error": None}


def latent_prompt(latent_index, topacts, table, template, settings, model: str
                  ) -> tuple[prompts.Prompt, dict]:
  """The prompt about one latent, and the start of its record; BadImage when one of its images
  cannot be read."""
  latent = topacts.latent(latent_index)
  ids, maps = latent.image_ids[:settings.num_images], latent.maps[:settings.num_images]
  record = new_record(latent_index, topacts, settings, model)
  masked = [visual.dim_mask(table.load(int(i)), m, topacts.grid, settings.image_size,
                            table.record(int(i)).get("view", "squash")) for i, m in zip(ids, maps)]
  shown = [visual.image_grid(masked)] if settings.grid else masked
  texts = settings.text_contexts(latent_index) if settings.text_contexts else None
  if texts:
    record["text_contexts"] = texts
  prompt = template.render([visual.png_bytes(image) for image in shown], num_images=len(masked),
                           text_contexts=texts)
  return prompt, record


def answered_record(record: dict, raw: str) -> dict:
  status, explanation = prompts.parse_explanation(raw)
  return {**record, "status": status, "explanation": explanation, "raw": raw}


def _explain_one(latent_index, topacts, table, template, explainer, cache, settings, counters):
  try:
    prompt, record = latent_prompt(latent_index, topacts, table, template, settings,
                                   explainer.name)
  except BadImage as e:
    return {**new_record(latent_index, topacts, settings, explainer.name),
            "status": prompts.FAILED, "error": str(e)}
  key = ResponseCache.key(explainer.identity, prompt)
  raw = cache.get(key)
  if raw is not None:
    counters.add("cache_hits")
    return answered_record({**record, "cached": True}, raw)
  try:
    raw, record["attempts"] = with_retries(lambda: explainer.complete(prompt), settings, counters)
  except ExplainerError as e:
    if e.fatal:
      raise  # no request can succeed (unreachable server, wrong key): stop the job
    return {**record, "status": prompts.FAILED, "error": str(e)}
  cache.put(key, raw)
  return answered_record(record, raw)


def run(topacts, table, latents: list[int], template, explainer, out: Path,
        settings: JobSettings, results: Path | None = None) -> dict:
  """Explains `latents` not finished in `results` (default out/explanations.jsonl); returns the
  counts of this run."""
  results = results or out / "explanations.jsonl"
  results.parent.mkdir(parents=True, exist_ok=True)
  log = ResultsLog(results)
  cache, counters = ResponseCache(out / "cache"), Counters()
  done = log.finished()
  todo = [i for i in latents if i not in done]
  start = time.perf_counter()
  statuses = run_bounded(
      todo, lambda i: _explain_one(i, topacts, table, template, explainer, cache, settings,
                                   counters), log, settings.concurrency, "explain")
  seconds = time.perf_counter() - start
  return {"latents": len(latents), "already_finished": len(latents) - len(todo),
          "explained": len(todo), "by_status": dict(sorted(statuses.items())),
          "requests": counters.values["requests"], "retries": counters.values["retries"],
          "cache_hits": counters.values["cache_hits"], "seconds": round(seconds, 3),
          "latents_per_s": round(len(todo) / seconds, 3) if seconds > 0 else None}


def worker_results(out: Path, index: int, count: int) -> Path:
  """The explanations.jsonl of one worker of `count` (the whole job's with one worker)."""
  if count == 1:
    return out / "explanations.jsonl"
  return out / "parts" / f"explanations.worker{index}-of-{count}.jsonl"


def worker_latents(latents: list[int], index: int, count: int) -> list[int]:
  """Worker `index`'s share: every count-th latent, so that dense and sparse latents (the
  selection's order) spread evenly."""
  return latents[index::count]


def merge_workers(out: Path, latents: list[int], count: int) -> str | None:
  """Writes out/explanations.jsonl, in latent order, from the parts of `count` workers once every
  latent of `latents` is finished there; returns None then, else what it waits for."""
  merged = {}
  for index in range(count):
    path = worker_results(out, index, count)
    try:
      records = read_explanations(path) if path.exists() else {}
    except ResultsError as e:  # e.g. a line that worker is writing right now
      return f"worker {index}: {e}"
    for latent in worker_latents(latents, index, count):
      record = records.get(latent)
      if record is None or record["status"] not in FINISHED:
        return f"worker {index}: latent {latent} is not finished"
      merged[latent] = record
  atomic_write_bytes(out / "explanations.jsonl", b"".join(
      (json.dumps(merged[i], sort_keys=True) + "\n").encode() for i in sorted(merged)))
  return None
