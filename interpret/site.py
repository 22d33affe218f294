"""HTML of the feature dashboard: an index of latents and one page per latent.

Everything a model or a user wrote (explanations, raw answers, image sources, prompts) goes through
`html.escape` in the pages, and through `_json_for_script` plus `textContent` in the index's
script, so it can never become markup. No external resources: the site works offline.
"""

from __future__ import annotations

import html
import json

import numpy as np

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; }
th, td { padding: 0.3em 0.6em; border-bottom: 1px solid #ddd; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
.explanation { font-size: 1.3em; margin: 0.5em 0; }
.status-ok { color: #176317; } .status-unable, .status-parse_error, .status-failed { color: #a33; }
.images td { text-align: center; font-size: 0.85em; }
.images img { display: block; margin: 2px auto; }
pre { white-space: pre-wrap; background: #f7f7f7; padding: 0.5em; max-width: 60em; }
input, select { font-size: 1em; padding: 0.2em; margin-right: 1em; }
.bar { fill: #7b2cbf; } .bar:hover { fill: #f0a500; }
"""

INDEX_SCRIPT = """
const data = JSON.parse(document.getElementById("latent-data").textContent);
const search = document.getElementById("search");
const sortBy = document.getElementById("sort");
const rows = document.getElementById("rows");
const count = document.getElementById("count");
const LIMIT = 2000;
// ?q=TEXT&sort=KEY preset the controls, so a view can be linked.
const params = new URLSearchParams(window.location.search);
search.value = params.get("q") || "";
if (params.has("sort")) sortBy.value = params.get("sort");
function value(entry, key) {
  if (key === "latent") return -entry.latent;
  if (key === "density") return entry.density;
  const score = entry.scores[key];
  return score === undefined ? -Infinity : score;
}
function cell(row, text) { const td = row.insertCell(); td.textContent = text; return td; }
function render() {
  const q = search.value.toLowerCase();
  const key = sortBy.value;
  const shown = data.filter(e => (e.explanation || "").toLowerCase().includes(q));
  shown.sort((a, b) => value(b, key) - value(a, key));
  rows.replaceChildren();
  for (const entry of shown.slice(0, LIMIT)) {
    const row = rows.insertRow();
    const link = document.createElement("a");
    link.href = "latents/" + entry.latent + ".html";
    link.textContent = entry.latent;
    row.insertCell().appendChild(link);
    cell(row, entry.explanation || "").className = "explanation-cell";
    cell(row, entry.status).className = "status-" + entry.status;
    cell(row, entry.density.toPrecision(3));
    for (const name of scoreNames) {
      const score = entry.scores[name];
      cell(row, score === undefined ? "" : score.toFixed(3));
    }
  }
  count.textContent = shown.length + " of " + data.length + " latents" +
      (shown.length > LIMIT ? " (first " + LIMIT + " shown)" : "");
}
search.addEventListener("input", render);
sortBy.addEventListener("change", render);
render();
"""


def _json_for_script(obj) -> str:
  """JSON that cannot end its <script> element early (no literal <, > or &)."""
  return (json.dumps(obj).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))


def _page(title: str, body: str, css: str) -> str:
  return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
          f"<title>{html.escape(title)}</title><link rel=\"stylesheet\" href=\"{css}\"></head>"
          f"<body>\n{body}\n</body></html>\n")


def index_page(entries: list[dict], score_names: list[str], title: str) -> str:
  """`entries`: {latent, explanation, status, density, scores: {name: value}} per latent."""
  options = "".join(f"<option value=\"{html.escape(k)}\">{html.escape(label)}</option>"
                    for k, label in [("latent", "latent"), ("density", "density (high first)")]
                    + [(n, f"{n} (high first)") for n in score_names])
  heads = "".join(f"<th>{html.escape(h)}</th>"
                  for h in ["latent", "explanation", "status", "density", *score_names])
  body = f"""<h1>{html.escape(title)}</h1>
<p><input id="search" type="search" placeholder="search explanations" size="40">
sort by <select id="sort">{options}</select> <span id="count"></span></p>
<table><thead><tr>{heads}</tr></thead><tbody id="rows"></tbody></table>
<noscript>The index needs JavaScript; the pages in latents/ do not.</noscript>
<script type="application/json" id="latent-data">{_json_for_script(entries)}</script>
<script>const scoreNames = {_json_for_script(score_names)};{INDEX_SCRIPT}</script>"""
  return _page(title, body, "style.css")


def histogram_svg(counts: np.ndarray, edges: np.ndarray, width: int = 480, height: int = 140) -> str:
  """Bars of the activation histogram; each bar's tooltip gives its range and count."""
  counts = np.asarray(counts, np.float64)
  top = max(counts.max(initial=0.0), 1.0)
  bar = width / max(len(counts), 1)
  bars = []
  for i, c in enumerate(counts):
    h = (height - 20) * c / top
    bars.append(f"<rect class=\"bar\" x=\"{i * bar:.2f}\" y=\"{height - 20 - h:.2f}\" "
                f"width=\"{max(bar - 1, 1):.2f}\" height=\"{h:.2f}\"><title>[{edges[i]:.4g}, "
                f"{edges[i + 1]:.4g}): {int(c)}</title></rect>")
  return (f"<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" "
          f"role=\"img\" aria-label=\"activation histogram\">{''.join(bars)}"
          f"<text x=\"0\" y=\"{height - 4}\" font-size=\"11\">{edges[0]:.4g}</text>"
          f"<text x=\"{width}\" y=\"{height - 4}\" font-size=\"11\" text-anchor=\"end\">"
          f"{edges[-1]:.4g}</text></svg>")


def latent_page(latent, record: dict | None, scores: dict, images: list[dict], edges: np.ndarray,
                neighbours: tuple[int | None, int | None], title: str) -> str:
  """One latent: explanation, statistics, histogram and its top images.

  `images`: {id, score, source, files: {original, mask, heatmap} | None, error} per top image.
  """
  e = html.escape
  status = record["status"] if record else "not explained"
  explanation = (record or {}).get("explanation") or ""
  nav = " | ".join(["<a href=\"../index.html\">index</a>"]
                   + [f"<a href=\"{n}.html\">{label} ({n})</a>"
                      for n, label in zip(neighbours, ("previous", "next")) if n is not None])
  stats = [("status", f"<span class=\"status-{e(status)}\">{e(status)}</span>"),
           ("density", f"{latent.density:.6g}"),
           ("explainer", e(str((record or {}).get("model", "")))),
           *[(e(name), f"{value:.4f}") for name, value in sorted(scores.items())]]
  stat_rows = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in stats)
  cells = []
  for image in images:
    if image["files"]:
      pictures = "".join(f"<img src=\"{e(image['files'][kind])}\" alt=\"{kind}\" width=\"224\">"
                         for kind in ("original", "mask", "heatmap"))
    else:
      pictures = f"<p class=\"status-failed\">{e(image['error'])}</p>"
    cells.append(f"<td>{pictures}image {image['id']}, score {image['score']:.4g}<br>"
                 f"<small>{e(str(image['source']))}</small></td>")
  raw = (record or {}).get("raw")
  body = f"""<p>{nav}</p>
<h1>Latent {latent.index}</h1>
<p class="explanation">{e(explanation) if explanation else "<i>no explanation</i>"}</p>
<table>{stat_rows}</table>
<h2>Activation histogram</h2>
{histogram_svg(latent.histogram, edges)}
<h2>Top images</h2>
<p>Each column: the image, the paper's visual prompt (inactive regions darkened), and a heatmap
scaled by this latent's largest patch activation over these images.</p>
<table class="images"><tr>{''.join(cells)}</tr></table>
{f"<h2>Explainer's answer</h2><pre>{e(raw)}</pre>" if raw else ""}"""
  return _page(f"{title}: latent {latent.index}", body, "../style.css")
