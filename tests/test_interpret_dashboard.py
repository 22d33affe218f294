"""The static dashboard: files, escaping of model text, and a render in headless Chromium."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest

import numpy as np

import fakes
from interpret import jobs
from interpret import site as site_lib
from interpret.dashboard import ScoresError, load_scores

XSS = "<script>document.title='pwned'</script><img src=x onerror=\"document.title='pwned'\">"


def chromium_binary():
  found = shutil.which("chromium") or shutil.which("chromium-browser")
  if found is None:
    if os.environ.get("CI"):
      pytest.fail("chromium is not installed; .ci/run must `apt-get install -y chromium`")
    pytest.skip("chromium is not installed (apt-get install -y chromium); required in CI")
  return found


def dump_dom(url: str, profile: Path, *options: str) -> str:
  result = subprocess.run(
      [chromium_binary(), "--headless", "--no-sandbox", "--disable-gpu",
       "--disable-background-networking", "--disable-component-update", "--disable-sync",
       "--no-first-run", f"--user-data-dir={profile}", *options, "--dump-dom", url],
      capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  return result.stdout


@pytest.fixture(scope="module")
def site(tmp_path_factory):
  root = tmp_path_factory.mktemp("dashboard")
  acts = fakes.write_topacts(root / "topacts")
  (root / "images" / "missing").mkdir(parents=True)
  (acts / "images" / "4.png").unlink()  # latent 3's second image and latent 4's first: missing
  explanations = root / "explanations.jsonl"
  records = [{"latent": 0, "status": "ok", "explanation": XSS, "raw": "[EXPLANATION]: " + XSS,
              "model": "m"},
             {"latent": 1, "status": "ok", "explanation": "striped fabric", "raw": "x", "model": "m"},
             {"latent": 3, "status": "parse_error", "explanation": None, "raw": "blah", "model": "m"},
             {"latent": 4, "status": "ok", "explanation": "red things", "raw": "y", "model": "m"}]
  explanations.write_text("".join(json.dumps(r) + "\n" for r in records))
  scores = root / "scores.json"
  scores.write_text(json.dumps({"0": {"clip": 20.5, "auroc": 0.5}, "1": {"clip": 30.25}, "4": 12,
                                "3": {"clip": float("nan"), "auroc": float("inf")}}))
  concepts = root / "concepts" / "per_latent.jsonl"  # as eval.concepts writes it
  concepts.parent.mkdir()
  concepts.write_text(json.dumps({"latent": 0, "concept": XSS, "iou": 0.5, "random_iou": 0.25})
                      + "\n" + json.dumps({"latent": 1, "concept": "shape:rectangle", "iou": 0.75,
                                           "random_iou": 0.125, "images": 8}) + "\n")
  out = root / "site"
  result = subprocess.run(
      [sys.executable, "-m", "interpret.dashboard", f"--topacts={acts}",
       f"--explanations={explanations}", f"--scores={scores}", f"--out={out}", "--image_size=32",
       f"--concepts={concepts.parent}",
       "--title=Test site"], capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  return out, summary, root


def test_files_and_summary(site):
  out, summary, _ = site
  assert summary["latents"] == 4 and summary["explained"] == 4  # restricted to explained latents
  assert summary["score_names"] == ["auroc", "clip", "concept_iou", "concept_random_iou", "score"]
  for kind in ("original", "mask", "heatmap"):
    assert (out / "latents" / "1" / f"top2_{kind}.png").exists()
  assert not (out / "latents" / "2.html").exists()
  page = (out / "latents" / "3.html").read_text()
  assert "4.png" in page and "not found" in page  # a missing image is reported, not fatal
  assert "<svg" in (out / "latents" / "1.html").read_text()


def test_model_text_is_escaped_in_the_files(site):
  out = site[0]
  page = (out / "latents" / "0.html").read_text()
  assert "<script>document" not in page and "&lt;script&gt;document.title" in page
  assert "<script>document" not in (out / "index.html").read_text()
  assert "<b>&lt;script&gt;document.title" in page  # the concept name too


def test_the_planted_concept_is_shown_beside_the_explanation(site):
  page = (site[0] / "latents" / "1.html").read_text()
  explanation = page.index("striped fabric")
  concept = page.index("<b>shape:rectangle</b>, IoU 0.750 (its maps placed at random: 0.125)")
  assert explanation < concept < page.index("<table>")
  assert "<th>concept_iou</th><td>0.7500</td>" in page


def test_latent_page_renders_in_chromium(site):
  out, _, root = site
  dom = dump_dom((out / "latents" / "0.html").as_uri(), root / "profile1")
  assert "<title>Test site: latent 0</title>" in dom  # the explanation's script did not run
  assert "pwned" in dom and "&lt;script&gt;document.title='pwned'&lt;/script&gt;" in dom
  assert "Activation histogram" in dom and "top0_heatmap.png" in dom and "20.5000" in dom


def table_rows(dom: str) -> list[str]:
  body = dom[dom.index('<tbody id="rows">'):dom.index("</tbody>")]
  return body.split("<tr>")[1:]


def latent_of(row: str) -> str:
  return row[row.index("latents/") + len("latents/"):row.index(".html")]


def test_index_renders_searches_and_sorts_in_chromium(site):
  out, _, root = site
  dom = dump_dom((out / "index.html").as_uri(), root / "profile2")
  assert "<title>Test site</title>" in dom
  assert "4 of 4 latents" in dom  # the script ran and built the rows
  rows = table_rows(dom)
  assert [latent_of(row) for row in rows] == ["0", "1", "3", "4"]
  assert rows[2].count("<td>n/a</td>") == 2  # latent 3's NaN clip and infinite auroc
  assert "&lt;script&gt;document.title='pwned'&lt;/script&gt;" in rows[0]
  assert "striped fabric" in rows[1] and "30.250" in rows[1]
  assert "striped fabric</td><td>shape:rectangle</td>" in rows[1]
  assert "planted concept" in dom
  dom = dump_dom((out / "index.html").as_uri() + "?q=" + quote("STRIPED"), root / "profile3")
  rows = table_rows(dom)
  assert "1 of 4 latents" in dom and len(rows) == 1 and "striped fabric" in rows[0]
  dom = dump_dom((out / "index.html").as_uri() + "?sort=clip", root / "profile4")
  assert [latent_of(row) for row in table_rows(dom)] == ["1", "0", "3", "4"]  # n/a, unscored last


def test_non_finite_scores_read_n_a_on_the_latent_page(site):
  page = (site[0] / "latents" / "3.html").read_text()
  assert "<th>auroc</th><td>n/a</td>" in page and "<th>clip</th><td>n/a</td>" in page


LAYOUT_PROBE = """<script>addEventListener("load", () => {
  const figures = document.querySelectorAll(".images figure");
  const boxes = [...figures].map(f => f.getBoundingClientRect());
  document.title = JSON.stringify({width: document.documentElement.clientWidth,
                                   boxes: boxes.map(b => [b.top, b.right])});
});</script>"""


def figure_layout(site, width: int, profile: str) -> dict:
  """Where latent 1's three top images land in a `width` px wide window."""
  out, _, root = site
  probe = out / "latents" / "layout_probe.html"
  page = (out / "latents" / "1.html").read_text()
  probe.write_text(page.replace("</body>", LAYOUT_PROBE + "</body>"))
  dom = dump_dom(probe.as_uri(), root / profile, f"--window-size={width},800")
  return json.loads(re.search(r"<title>(.*)</title>", dom)[1])


def test_top_images_wrap_on_a_narrow_screen(site):
  wide = figure_layout(site, 1200, "profile5")
  assert len(wide["boxes"]) == 3 and len({top for top, _ in wide["boxes"]}) == 1  # one row
  narrow = figure_layout(site, 420, "profile6")
  assert len({top for top, _ in narrow["boxes"]}) == 3  # one image per row
  assert all(right <= narrow["width"] for _, right in narrow["boxes"])


def test_histogram_axis_spans_the_bins_with_data():
  edges = np.logspace(-3, 3, 49)  # sae_jax.scan's default: six decades
  counts = np.zeros(48, np.int64)
  counts[[20, 21, 23]] = [5, 40, 2]  # activations around 1: four bins of the 48
  svg = site_lib.histogram_svg(counts, edges, width=480)
  bars = [(float(x), float(w)) for x, w in re.findall(r'<rect class="bar" x="([\d.]+)" y="[\d.]+" '
                                                      r'width="([\d.]+)"', svg)]
  assert [x for x, _ in bars] == [0, 120, 240, 360]  # the four bins fill the axis
  assert all(0 < w and x + w <= 480 for x, w in bars)
  labels = re.findall(r'font-size="11"(?: text-anchor="end")?>([^<]+)</text>', svg)
  assert labels == ["40", f"{edges[20]:.4g}", f"{edges[24]:.4g}"]  # top count, axis ends
  ranges = [tuple(map(float, r)) for r in re.findall(r"<title>\[([^,]+), ([^)]+)\)", svg)]
  assert all(float(labels[1]) <= lo < hi <= float(labels[2]) for lo, hi in ranges)
  assert "<svg" not in site_lib.histogram_svg(np.zeros(48), edges)  # a latent that never fired


def test_bad_explanations_line_is_a_one_line_error(tmp_path):
  acts = fakes.write_topacts(tmp_path / "topacts")
  explanations = tmp_path / "explanations.jsonl"
  explanations.write_bytes(b'{"latent": 0, "status": "ok", "explanation": "x"}\n'
                           b'{"latent": 1, "status": "ok", "explanation": "caf\xe9"}\n')
  result = subprocess.run(
      [sys.executable, "-m", "interpret.dashboard", f"--topacts={acts}",
       f"--explanations={explanations}", f"--out={tmp_path / 'site'}"],
      capture_output=True, text=True, timeout=120)
  assert result.returncode == 1 and "Traceback" not in result.stderr
  error = json.loads(result.stdout.strip())["error"]
  assert error.startswith(f"{explanations}:2: not UTF-8") and "\n" not in error


def test_scores_files_read_with_their_faults_named(tmp_path):
  jsonl = tmp_path / "per_latent.jsonl"
  jsonl.write_text('{"latent": 2, "clip": NaN, "label": "x"}\n{"latent": 5, "clip": 1.5}')
  scores = load_scores(str(jsonl))  # the last line is read without its newline; NaN is kept
  assert list(scores) == [2, 5] and scores[5] == {"clip": 1.5} and np.isnan(scores[2]["clip"])
  jsonl.write_text('{"latent": 2, "clip": 1}\n{"latent": "two", "clip": 1}\n')
  with pytest.raises(ScoresError, match=rf"{jsonl}:2: expected"):
    load_scores(str(jsonl))
  jsonl.write_bytes(b'{"latent": 2, "clip": 1}\n{"latent": 3, "note": "\xff"}\n')
  with pytest.raises(jobs.ResultsError, match=rf"{jsonl}:2: not UTF-8"):
    load_scores(str(jsonl))
  plain = tmp_path / "scores.json"
  plain.write_bytes(b'{"1": {"clip": 2, "note": "\xff"}}')
  with pytest.raises(ScoresError, match="UnicodeDecodeError"):
    load_scores(str(plain))


def test_a_bad_concepts_row_is_named(tmp_path):
  from interpret.dashboard import load_concepts
  rows = tmp_path / "per_latent.jsonl"
  rows.write_text('{"latent": 2, "concept": "shape:line", "iou": 0.5}\n{"concept": "x"}\n')
  with pytest.raises(ScoresError, match=f"^--concepts={rows}:2: expected a row of eval.concepts"):
    load_concepts(str(rows))
  rows.write_text('{"latent": 2, "concept": "shape:line", "iou": 0.5, "random_iou": null}\n')
  assert load_concepts(str(tmp_path)) == {2: {"concept": "shape:line", "iou": 0.5}}
