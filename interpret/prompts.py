"""The explainer prompt (an editable template file) and the parsing of its answer.

A `Prompt` is backend-neutral: system text, user text and PNG images (shown after the user text).
The explainer clients (`interpret.explainers`) turn it into their own message format.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

DEFAULT_TEMPLATE = Path(__file__).parent / "templates" / "explain.txt"
SECTIONS = ("system", "user")  # required; "assistant" (the start of the answer) is optional
_HEADER = re.compile(r"^\[(system|user|assistant)\]\s*$")
# The last "[EXPLANATION]: ..." line; tolerant of markdown bold around the tag.
_EXPLANATION = re.compile(r"\[EXPLANATION\]\**\s*:\s*\**\s*(.*)")
_UNABLE = re.compile(r"^\W*unable\b", re.IGNORECASE)

OK, UNABLE, PARSE_ERROR, FAILED = "ok", "unable", "parse_error", "failed"
TEXT_INTRO = ("The neuron also fires on text. Its strongest text tokens, each shown in the words "
              "around it with the firing token in [[double brackets]] (<image> marks image "
              "tokens):")

# The user text for a latent with text contexts and no image, unless the template places
# {text_contexts} itself.
TEXT_ONLY_USER = (
    "This neuron fires on text tokens, not on images: no image is shown. Find what the firing "
    "tokens (in [[double brackets]]) have in common, in their context. Give a short, literal "
    "description. End your answer with a final line that starts with \"[EXPLANATION]:\" followed "
    "by the description; if they share nothing you can describe, the final line must be "
    "\"[EXPLANATION]: Unable to produce descriptions\".")


def format_contexts(contexts) -> list[str]:
  """One line per interpret.textctx.TextContext: the window with the firing token bracketed."""
  return [" ".join(part for part in (c.before, f"[[{c.token}]]", c.after) if part)
          for c in contexts]


class TemplateError(ValueError):
  """A prompt template file without the [system] and [user] sections."""


@dataclasses.dataclass(frozen=True)
class Template:
  system: str
  user: str
  assistant: str = ""

  def render(self, images: list[bytes], num_images: int | None = None,
             text_contexts: list[str] | None = None) -> "Prompt":
    """`num_images`: how many top images `images` show (more than len(images) when tiled).

    `text_contexts` (lines from `format_contexts`) replace {text_contexts} in the user text, or
    follow it under TEXT_INTRO when the template has no such placeholder."""
    count = len(images) if num_images is None else num_images
    fill = lambda text: text.replace("{num_images}", str(count))
    listed = ""
    if text_contexts:
      listed = TEXT_INTRO + "\n" + "\n".join(f"{n}. {line}" for n, line in
                                              enumerate(text_contexts, 1))
    user = fill(self.user)
    if "{text_contexts}" in user:
      user = user.replace("{text_contexts}", listed)
    elif listed and not images:  # a text-only latent: the image instructions do not apply
      user = f"{TEXT_ONLY_USER}\n\n{listed}"
    elif listed:
      user = f"{user}\n\n{listed}"
    return Prompt(fill(self.system), user, tuple(images), fill(self.assistant))


@dataclasses.dataclass(frozen=True)
class Prompt:
  system: str
  user: str
  images: tuple[bytes, ...]  # PNG bytes, shown after the user text
  # The answer's first words, written for the model to continue (e.g. "[EXPLANATION]:"): keeps a
  # weak explainer on format. Backends return it as part of the answer.
  answer_prefix: str = ""


def load_template(path: str | Path | None = None) -> Template:
  """Reads a template: comment lines, then `[system]` and `[user]` sections (see the default)."""
  path = Path(path) if path else DEFAULT_TEMPLATE
  try:
    lines = path.read_text().splitlines()
  except OSError as e:
    raise TemplateError(f"--prompt_template={path}: cannot read it ({e})") from e
  sections: dict[str, list[str]] = {}
  current = None
  for line in lines:
    header = _HEADER.match(line)
    if header:
      current = sections.setdefault(header[1], [])
    elif current is not None:
      current.append(line)
  missing = [s for s in SECTIONS if not "\n".join(sections.get(s, [])).strip()]
  if missing:
    raise TemplateError(f"--prompt_template={path}: sections {missing} are missing or empty "
                        "(each starts with a line '[system]' or '[user]')")
  return Template(*("\n".join(sections[s]).strip() for s in SECTIONS),
                  assistant="\n".join(sections.get("assistant", [])).strip())


def parse_explanation(text: str) -> tuple[str, str | None]:
  """(status, explanation): ok with the text, unable, or parse_error with None."""
  matches = _EXPLANATION.findall(text or "")
  if not matches:
    return PARSE_ERROR, None
  explanation = matches[-1].strip().strip("*\"'").strip()
  if not explanation:
    return PARSE_ERROR, None
  if _UNABLE.match(explanation):
    return UNABLE, None
  return OK, explanation
