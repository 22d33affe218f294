"""One page of results, written as markdown and as HTML: sections of paragraphs, tables and
pictures. Every string is escaped in both (it may come from a model or a file), so no input can
inject markup. Shared by eval.report and eval.sweep_report; defines no flags."""

from __future__ import annotations

import dataclasses
import html
import json
from pathlib import Path


class ReportError(ValueError):
  """An input that is missing or unreadable."""


@dataclasses.dataclass
class Table:
  headers: list[str]
  rows: list[list]


@dataclasses.dataclass
class Picture:
  file: str  # relative to the report
  alt: str


@dataclasses.dataclass
class Section:
  title: str
  blocks: list  # str (a paragraph), Table or Picture


def read_json(path: Path, flag: str):
  try:
    return json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise ReportError(f"--{flag}: cannot read {path} ({e})") from e


def read_jsonl(path: Path, flag: str) -> list[dict]:
  """The records of a JSONL file; a last line without newline (a killed writer's) is dropped."""
  try:
    text = path.read_text()
  except OSError as e:
    raise ReportError(f"--{flag}: cannot read {path} ({e})") from e
  lines = text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]
  rows = []
  for number, line in enumerate(lines, 1):
    if line.strip():
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ReportError(f"--{flag}: {path}:{number} is not JSON ({e})") from e
  return rows


def fmt(value) -> str:
  if isinstance(value, float):
    return f"{value:.4g}"  # CLIP scores read 24.92, AUROCs 0.6234, small losses 0.0001402
  return "" if value is None else str(value)


def _md_text(text) -> str:
  """Model text as literal markdown: no HTML, links, emphasis or table breaks."""
  text = html.escape(" ".join(str(text).split()), quote=False)
  return "".join("\\" + c if c in "\\`*_[]|#$" else c for c in text)  # $: math on GitHub


def to_markdown(title: str, sections: list[Section]) -> str:
  lines = [f"# {_md_text(title)}", ""]
  for section in sections:
    lines += [f"## {_md_text(section.title)}", ""]
    for block in section.blocks:
      if isinstance(block, Table):
        lines.append("| " + " | ".join(_md_text(h) for h in block.headers) + " |")
        lines.append("|" + "---|" * len(block.headers))
        lines += ["| " + " | ".join(_md_text(c) for c in row) + " |" for row in block.rows]
      elif isinstance(block, Picture):
        lines.append(f"![{_md_text(block.alt)}]({block.file})")
      else:
        lines.append(_md_text(block))
      lines.append("")
  return "\n".join(lines)


_STYLE = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;"
          "color:#222}table{border-collapse:collapse;margin:.5em 0 1.2em}td,th{border:1px solid "
          "#ccc;padding:.25em .6em;text-align:left;vertical-align:top}th{background:#f3f3f3}"
          "img{max-width:100%}")


def to_html(title: str, sections: list[Section]) -> str:
  e = lambda value: html.escape(str(value), quote=True)
  parts = ["<!doctype html>", '<html><head><meta charset="utf-8">',
           f"<title>{e(title)}</title><style>{_STYLE}</style></head><body>", f"<h1>{e(title)}</h1>"]
  for section in sections:
    parts.append(f"<h2>{e(section.title)}</h2>")
    for block in section.blocks:
      if isinstance(block, Table):
        parts.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in block.headers) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in block.rows]
        parts.append("</table>")
      elif isinstance(block, Picture):
        parts.append(f'<p><img src="{e(block.file)}" alt="{e(block.alt)}"></p>')
      else:
        parts.append(f"<p>{e(block)}</p>")
  parts.append("</body></html>")
  return "\n".join(parts) + "\n"
