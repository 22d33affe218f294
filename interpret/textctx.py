"""Text contexts of a latent's top text tokens: the scan's (image id, position) decoded to words.

`sae_jax.scan` records each latent's top text rows by store row, image id and token position only
(sae_jax has no tokenizer). `harvest` puts the prompt's text tokens ([position, token id] pairs) in
every image record; here a window of them around the firing token is decoded with the model's
tokenizer. Image tokens inside the window show as IMAGE_MARK. Stores harvested before the records
carried text tokens give no contexts (`contexts` returns None), and the callers say so.
"""

from __future__ import annotations

import dataclasses

IMAGE_MARK = "<image>"
NO_TOKENS_NOTE = ("the store's image records have no text_tokens (harvested before they were "
                  "recorded): text contexts cannot be decoded; reharvest to see them")


class TextContextError(ValueError):
  """No tokenizer can be found for the text contexts; the message names the flag."""


@dataclasses.dataclass(frozen=True)
class TextContext:
  image_id: int
  position: int
  value: float
  before: str  # decoded tokens before the firing one, within the window
  token: str  # the firing token, decoded
  after: str


def tokenizer_path(topacts, override: str | None = None) -> str:
  """--tokenizer if given, else the `model` of the store that was scanned (its manifest)."""
  if override:
    return override
  from sae_jax.store import Store  # reads local and object-storage stores alike
  store = topacts.header.get("store", "")
  try:
    return Store(store, allow_incomplete=True).manifest["model"]
  except (OSError, ValueError, KeyError) as e:  # StoreError is a ValueError
    raise TextContextError(f"cannot find the model's tokenizer from the store {store} ({e}); "
                           "pass --tokenizer=PATH_OR_HUB_ID") from e


def load_tokenizer(path: str):
  import transformers  # the torch side only
  try:
    return transformers.AutoTokenizer.from_pretrained(path)
  except (OSError, ValueError) as e:
    raise TextContextError(f"cannot load the tokenizer {path!r} for the text contexts ({e}); "
                           "pass --tokenizer=PATH_OR_HUB_ID") from e


def _decode(tokenizer, pairs: list[list[int]], last: int | None = None,
            end: int | None = None) -> str:
  """Decodes [position, id] pairs; a gap in positions (image tokens) becomes IMAGE_MARK, also
  one after position `last` (before the first pair) or before position `end` (after the last)."""
  parts, run = [], []
  if pairs and last is not None and pairs[0][0] != last + 1:
    parts.append(IMAGE_MARK)
  previous = None
  for position, token in pairs:
    if previous is not None and position != previous + 1:
      parts += [tokenizer.decode(run), IMAGE_MARK]
      run = []
    run.append(token)
    previous = position
  if run:
    parts.append(tokenizer.decode(run))
  if pairs and end is not None and pairs[-1][0] != end - 1:
    parts.append(IMAGE_MARK)
  return " ".join(p for p in parts if p) if len(parts) > 1 else "".join(parts)


def contexts(topacts, latent: int, records: dict[int, dict], tokenizer,
             window: int = 8, limit: int | None = None) -> list[TextContext] | None:
  """The latent's top text tokens with `window` tokens (positions) either side, best first.

  `records`: image records by id (TOPACTS/images.jsonl or the store's table). None when a record
  has no text_tokens (an older store); [] when the latent has no text row."""
  rows = topacts.text_rows(latent)[:limit]
  out = []
  for row in rows:
    pairs = records.get(row.image_id, {}).get("text_tokens")
    if pairs is None:
      return None
    near = [p for p in pairs if row.position - window <= p[0] <= row.position + window]
    firing = [p for p in near if p[0] == row.position]
    out.append(TextContext(
        row.image_id, row.position, row.value,
        _decode(tokenizer, [p for p in near if p[0] < row.position], end=row.position),
        _decode(tokenizer, firing) if firing else "?",
        _decode(tokenizer, [p for p in near if p[0] > row.position], last=row.position)))
  return out


def prompt_lines_for(topacts, tokenizer, window: int = 8, limit: int = 5):
  """For the explainer: latent -> the prompt lines of its top text contexts when it is
  text-dominant (text share >= image share in the scan's modality profile), else None."""
  from interpret import prompts
  profile = topacts.modality()
  records = {r["id"]: r for r in topacts.images()}

  def lines(latent: int):
    if profile is None or profile["text_share"][latent] < profile["image_share"][latent]:
      return None
    found = contexts(topacts, latent, records, tokenizer, window, limit)
    if found is None:
      raise TextContextError(f"--text_contexts: {NO_TOKENS_NOTE}")
    return prompts.format_contexts(found) or None
  return lines
