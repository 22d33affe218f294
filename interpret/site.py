"""HTML of the feature dashboard: an index of latents and one page per latent.

Everything a model or a user wrote (explanations, raw answers, image sources, prompts) goes through
`html.escape` in the pages, and through `_json_for_script` plus `textContent` in the index's
script, so it can never become markup. No external resources: the site works offline.
"""

from __future__ import annotations

import html
import json
import math

import numpy as np

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; }
th, td { padding: 0.3em 0.6em; border-bottom: 1px solid #ddd; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
.explanation { font-size: 1.3em; margin: 0.5em 0; }
.status-ok { color: #176317; } .status-unable, .status-parse_error, .status-failed { color: #a33; }
.images { display: flex; flex-wrap: wrap; gap: 0.8em; }
.images figure { margin: 0; max-width: 224px; text-align: center; font-size: 0.85em; }
.images img { display: block; max-width: 100%; height: auto; margin: 2px auto; }
pre { white-space: pre-wrap; background: #f7f7f7; padding: 0.5em; max-width: 60em; }
input, select { font-size: 1em; padding: 0.2em; margin-right: 1em; }
svg { max-width: 100%; height: auto; }
.bar { fill: #7b2cbf; } .bar:hover { fill: #f0a500; }
mark.firing { background: #f0a500; font-weight: bold; }
.context { font-family: ui-monospace, monospace; white-space: pre-wrap; }
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
// A number is null where it was NaN or infinite (shown "n/a"), undefined where there is none.
function value(entry, key) {
  if (key === "latent") return -entry.latent;
  const number = key === "density" ? entry.density : entry.scores[key];
  return number == null ? -Infinity : number;
}
function formatted(number, format) {
  return number === undefined ? "" : number === null ? "n/a" : format(number);
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
    if (showConcepts) cell(row, entry.concept || "");
    cell(row, entry.status).className = "status-" + entry.status;
    cell(row, formatted(entry.density, x => x.toPrecision(3)));
    for (const name of scoreNames) cell(row, formatted(entry.scores[name], x => x.toFixed(3)));
  }
  count.textContent = shown.length + " of " + data.length + " latents" +
      (shown.length > LIMIT ? " (first " + LIMIT + " shown)" : "");
}
search.addEventListener("input", render);
sortBy.addEventListener("change", render);
render();
"""


def _json_for_script(obj) -> str:
  """JSON that cannot end its <script> element early (no literal <, > or &). NaN is no JSON: the
  page's JSON.parse would fail and leave it blank, so it is refused here."""
  text = json.dumps(obj, allow_nan=False)
  return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _finite(value) -> float | None:
  """`value` as a float, None for NaN and infinities (scores of degenerate latents)."""
  value = float(value)
  return value if math.isfinite(value) else None


def _number(value, spec: str) -> str:
  finite = _finite(value)
  return "n/a" if finite is None else format(finite, spec)


def _page(title: str, body: str, css: str) -> str:
  return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
          f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
          f"<title>{html.escape(title)}</title><link rel=\"stylesheet\" href=\"{css}\"></head>"
          f"<body>\n{body}\n</body></html>\n")


def headline_table(headline: list[dict]) -> str:
  """The ground-truth claims of eval.report's headline.json: claim, this run, baseline, target."""
  keys = ("claim", "reached", "baseline", "target")
  heads = "".join(f"<th>{h}</th>" for h in ("claim", "this run", "baseline", "target"))
  body = "".join("<tr>" + "".join(f"<td>{html.escape(str(row.get(k, '')))}</td>" for k in keys)
                 + "</tr>" for row in headline)
  return f"<h2>Ground truth</h2>\n<table><thead><tr>{heads}</tr></thead><tbody>{body}</tbody></table>"


def index_page(entries: list[dict], score_names: list[str], title: str,
               show_concepts: bool = False, headline: list[dict] | None = None) -> str:
  """`entries`: {latent, explanation, status, density, scores: {name: value}} per latent, and
  `concept` (the planted concept it matches, eval.concepts), a column when `show_concepts`;
  `headline`: the rows of eval.report's headline.json, shown first."""
  data = [{**entry, "density": _finite(entry["density"]),
           "scores": {name: _finite(v) for name, v in entry["scores"].items()}}
          for entry in entries]
  options = "".join(f"<option value=\"{html.escape(k)}\">{html.escape(label)}</option>"
                    for k, label in [("latent", "latent"), ("density", "density (high first)")]
                    + [(n, f"{n} (high first)") for n in score_names])
  heads = "".join(f"<th>{html.escape(h)}</th>"
                  for h in ["latent", "explanation", *(["planted concept"] if show_concepts else []),
                            "status", "density", *score_names])
  body = f"""<h1>{html.escape(title)}</h1>
{headline_table(headline) if headline else ""}
<p><input id="search" type="search" placeholder="search explanations" size="40">
sort by <select id="sort">{options}</select> <span id="count"></span></p>
<table><thead><tr>{heads}</tr></thead><tbody id="rows"></tbody></table>
<noscript>The index needs JavaScript; the pages in latents/ do not.</noscript>
<script type="application/json" id="latent-data">{_json_for_script(data)}</script>
<script>const scoreNames = {_json_for_script(score_names)};
const showConcepts = {_json_for_script(show_concepts)};{INDEX_SCRIPT}</script>"""
  return _page(title, body, "style.css")


def histogram_svg(counts: np.ndarray, edges: np.ndarray, width: int = 480, height: int = 140) -> str:
  """Bars of the activation histogram; each bar's tooltip gives its range and count.

  The axis spans the bins from the first to the last non-empty one: the scan's edges cover six
  decades, and a latent's activations a few bins of them.
  """
  counts = np.asarray(counts, np.float64)
  filled = np.flatnonzero(counts > 0)
  if not filled.size:
    return "<p>No activation recorded.</p>"
  first, end, top = filled[0], filled[-1] + 1, counts.max()
  step, base = width / (end - first), height - 20  # bar pitch; y of the axis line
  bars = []
  for i in range(first, end):
    h = (base - 14) * counts[i] / top  # 14 px left above for the label of `top`
    bars.append(f"<rect class=\"bar\" x=\"{(i - first) * step:.2f}\" y=\"{base - h:.2f}\" "
                f"width=\"{step * 0.85:.2f}\" height=\"{h:.2f}\"><title>[{edges[i]:.4g}, "
                f"{edges[i + 1]:.4g}): {int(counts[i])}</title></rect>")
  return (f"<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" "
          f"viewBox=\"0 0 {width} {height}\" role=\"img\" aria-label=\"activation histogram\">"
          f"{''.join(bars)}"
          f"<text x=\"0\" y=\"10\" font-size=\"11\">{int(top)}</text>"
          f"<line x1=\"0\" y1=\"{base}\" x2=\"{width}\" y2=\"{base}\" stroke=\"#888\"/>"
          f"<text x=\"0\" y=\"{height - 4}\" font-size=\"11\">{edges[first]:.4g}</text>"
          f"<text x=\"{width}\" y=\"{height - 4}\" font-size=\"11\" text-anchor=\"end\">"
          f"{edges[end]:.4g}</text></svg>")


def text_contexts_html(contexts: list | None, note: str | None = None) -> str:
  """The latent's top text tokens, each with its decoded window and the firing token marked.
  Every decoded piece is escaped: a prompt can hold any text."""
  e = html.escape
  if note:
    return f"<h2>Top text contexts</h2><p>{e(note)}</p>"
  if contexts is None:
    return ""
  if not contexts:
    return "<h2>Top text contexts</h2><p>This latent fired on no text token of the store.</p>"
  rows = "".join(
      f"<tr><td>{_number(c.value, '.4g')}</td><td>{c.image_id}:{c.position}</td>"
      f"<td class=\"context\">{e(c.before)} <mark class=\"firing\">{e(c.token)}</mark> "
      f"{e(c.after)}</td></tr>" for c in contexts)
  return ("<h2>Top text contexts</h2><table><tr><th>activation</th><th>input:position</th>"
          f"<th>context</th></tr>{rows}</table>")


def latent_page(latent, record: dict | None, scores: dict, images: list[dict], edges: np.ndarray,
                neighbours: tuple[int | None, int | None], title: str,
                concept: dict | None = None, modality: dict | None = None,
                text_html: str = "") -> str:
  """One latent: explanation, the planted concept it matches (`concept`: {concept, iou,
  random_iou} from eval.concepts), statistics, histogram and its top images.

  `images`: {id, score, source, files: {original, mask, heatmap} | None, error} per top image.
  `modality`: {modality, image_share, text_share, both} of the latent (sae_jax.formats.topacts);
  `text_html`: its top text contexts, from `text_contexts_html`.
  """
  e = html.escape
  status = record["status"] if record else "not explained"
  explanation = (record or {}).get("explanation") or ""
  nav = " | ".join(["<a href=\"../index.html\">index</a>"]
                   + [f"<a href=\"{n}.html\">{label} ({n})</a>"
                      for n, label in zip(neighbours, ("previous", "next")) if n is not None])
  stats = [("status", f"<span class=\"status-{e(status)}\">{e(status)}</span>"),
           ("density", _number(latent.density, ".6g")),
           ("explainer", e(str((record or {}).get("model", "")))),
           *([("modality", f"{e(modality['modality'])} (image share "
                           f"{_number(modality['image_share'], '.3f')}, text share "
                           f"{_number(modality['text_share'], '.3f')}, both "
                           f"{_number(modality['both'], '.3f')})")] if modality else []),
           *[(e(name), _number(value, ".4f")) for name, value in sorted(scores.items())]]
  stat_rows = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in stats)
  cells = []
  for image in images:
    if image["files"]:
      pictures = "".join(f"<img src=\"{e(image['files'][kind])}\" alt=\"{kind}\" width=\"224\">"
                         for kind in ("original", "mask", "heatmap"))
    else:
      pictures = f"<p class=\"status-failed\">{e(image['error'])}</p>"
    cells.append(f"<figure>{pictures}<figcaption>image {image['id']}, score "
                 f"{_number(image['score'], '.4g')}<br><small>{e(str(image['source']))}</small>"
                 "</figcaption></figure>")
  raw = (record or {}).get("raw")
  match = ""
  if concept and concept.get("concept"):
    match = (f"<p class=\"concept\">Best-matching planted concept: "
             f"<b>{e(concept['concept'])}</b>, IoU {_number(concept.get('iou', math.nan), '.3f')} "
             f"(its maps placed at random: {_number(concept.get('random_iou', math.nan), '.3f')})</p>")
  body = f"""<p>{nav}</p>
<h1>Latent {latent.index}</h1>
<p class="explanation">{e(explanation) if explanation else "<i>no explanation</i>"}</p>
{match}
<table>{stat_rows}</table>
<h2>Activation histogram</h2>
{histogram_svg(latent.histogram, edges)}
<h2>Top images</h2>
<p>Each column: the image, the paper's visual prompt (inactive regions darkened), and a heatmap
scaled by this latent's largest patch activation over these images.</p>
<div class="images">{''.join(cells)}</div>
{text_html}
{f"<h2>Explainer's answer</h2><pre>{e(raw)}</pre>" if raw else ""}"""
  return _page(f"{title}: latent {latent.index}", body, "../style.css")
