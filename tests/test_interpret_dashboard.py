"""The static dashboard: files, escaping of model text, and a render in headless Chromium."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest

import fakes

XSS = "<script>document.title='pwned'</script><img src=x onerror=\"document.title='pwned'\">"


def chromium_binary():
  found = shutil.which("chromium") or shutil.which("chromium-browser")
  if found is None:
    if os.environ.get("CI"):
      pytest.fail("chromium is not installed; .ci/run must `apt-get install -y chromium`")
    pytest.skip("chromium is not installed (apt-get install -y chromium); required in CI")
  return found


def dump_dom(url: str, profile: Path) -> str:
  result = subprocess.run(
      [chromium_binary(), "--headless", "--no-sandbox", "--disable-gpu",
       "--disable-background-networking", "--disable-component-update", "--disable-sync",
       "--no-first-run", f"--user-data-dir={profile}", "--dump-dom", url],
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
  scores.write_text(json.dumps({"0": {"clip": 20.5, "auroc": 0.5}, "1": {"clip": 30.25}, "4": 12}))
  out = root / "site"
  result = subprocess.run(
      [sys.executable, "-m", "interpret.dashboard", f"--topacts={acts}",
       f"--explanations={explanations}", f"--scores={scores}", f"--out={out}", "--image_size=32",
       "--title=Test site"], capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  return out, summary, root


def test_files_and_summary(site):
  out, summary, _ = site
  assert summary["latents"] == 4 and summary["explained"] == 4  # restricted to explained latents
  assert summary["score_names"] == ["auroc", "clip", "score"]
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
  assert "&lt;script&gt;document.title='pwned'&lt;/script&gt;" in rows[0]
  assert "striped fabric" in rows[1] and "30.250" in rows[1]
  dom = dump_dom((out / "index.html").as_uri() + "?q=" + quote("STRIPED"), root / "profile3")
  rows = table_rows(dom)
  assert "1 of 4 latents" in dom and len(rows) == 1 and "striped fabric" in rows[0]
  dom = dump_dom((out / "index.html").as_uri() + "?sort=clip", root / "profile4")
  assert [latent_of(row) for row in table_rows(dom)] == ["1", "0", "3", "4"]  # unscored last
