"""eval.report: training curves, quality scalars and CLIP scores on one page; model text escaped."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
XSS = "<script>document.title='pwned'</script><img src=x onerror=alert(1)> | [link](javascript:x)"


def report(*args):
  result = subprocess.run([sys.executable, "-m", "eval.report", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
  return result.returncode, json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture
def inputs(tmp_path):
  workdir = tmp_path / "workdir"
  workdir.mkdir()
  lines = [json.dumps({"step": s, "loss": 1 / s, "fvu": 1 / s, "dead_fraction": 0.5 / s,
                       "tokens_per_s": 1000.0 + s}) for s in range(1, 21)]
  # A killed trainer leaves a last line without its newline: ignored.
  (workdir / "metrics.jsonl").write_text("\n".join(lines) + "\n" + '{"step": 21, "lo')
  (workdir / "run.json").write_text(json.dumps({"sae": {"num_latents": 64, "k": 4},
                                                "source": {"model": "tiny", "layer": 1}}))
  quality = tmp_path / "quality.json"
  quality.write_text(json.dumps({"fvu": 0.125, "spliced": {"kl": 0.031}, "note": XSS,
                                 "per_layer": [1, 2]}))
  scores = tmp_path / "scores"
  scores.mkdir()
  metric = lambda mean: {"n": 2, "mean": mean, "median": mean, "ci95": [mean - 1, mean + 1]}
  (scores / "clip_scores.json").write_text(json.dumps({
      "format": "clip-scores", "version": 1,
      "settings": {"clip_model": "ViT-B-32", "clip_pretrained": "openai", "random_draws": 30},
      "latents": {"selected": 3, "scored": 2, "excluded": {"unable": 1}},
      "metrics": {"clip_score": metric(25.5), "random_baseline": metric(18.25),
                  "heldout_auroc": metric(0.75)}}))
  rows = [{"latent": 0, "explanation": XSS, "label": "dogs", "clip_score": 26.0,
           "random_baseline": 18.0, "shuffled_baseline": 19.0, "heldout_auroc": 0.5},
          {"latent": 1, "explanation": "cats", "label": None, "clip_score": 25.0,
           "random_baseline": 18.5, "shuffled_baseline": 20.0, "heldout_auroc": None},
          {"latent": 2, "explanation": None, "label": None, "excluded": "unable",
           "clip_score": None, "random_baseline": None, "shuffled_baseline": None,
           "heldout_auroc": None}]
  (scores / "per_latent.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  return workdir, quality, scores


def test_report_renders_every_input_and_escapes_model_text(inputs, tmp_path):
  workdir, quality, scores = inputs
  out = tmp_path / "report"
  code, summary = report(f"--workdir={workdir}", f"--sae_quality={quality}",
                         f"--clip_scores={scores}", f"--out={out}")
  assert code == 0, summary
  assert summary["sections"] == ["Training", "SAE quality", "CLIP score"]
  for png in ("training_curves.png", "score_distributions.png"):
    assert (out / png).read_bytes()[:4] == b"\x89PNG"
  page = (out / "report.html").read_text()
  markdown = (out / "report.md").read_text()
  for text in (page, markdown):
    assert "Last logged step: 20." in text and "0.05" in text  # the last complete line
    assert "spliced.kl" in text and "0.031" in text and "per_layer" not in text
    assert "25.5" in text and "[24.5, 26.5]" in text.replace("\\", "")
    assert "24.92" in text and "18.2" in text  # the paper's numbers
    assert "<script" not in text and "<img src=x" not in text
  assert "&lt;script&gt;" in page and page.count('<img src="') == 2
  assert "\\[link\\](javascript:x)" in markdown and "\\|" in markdown
  # Metrics in reading order, not the JSON file's alphabetical order.
  assert page.index("<td>clip_score</td>") < page.index("<td>heldout_auroc</td>")


@pytest.mark.parametrize("recovered, says", [(1.04, "above 1"), (-0.2, "below 0"), (0.9, None)])
def test_report_explains_loss_recovered(tmp_path, recovered, says):
  quality = tmp_path / "quality.json"
  quality.write_text(json.dumps({"fvu": 0.2, "loss_recovered": recovered, "text_targets": 37,
                                 "kl": {"sae": 0.01}}))
  code, summary = report(f"--sae_quality={quality}", f"--out={tmp_path / 'report'}")
  assert code == 0, summary
  markdown = (tmp_path / "report" / "report.md").read_text().replace("\\", "")  # unescaped
  assert "(L_zero - L_sae) / (L_zero - L_clean)" in markdown
  assert ("above 1" in markdown) == (says == "above 1")
  assert ("below 0" in markdown) == (says == "below 0")
  if says == "above 1":
    assert "37 text targets" in markdown and "no error" in markdown


def test_report_errors_name_the_input(inputs, tmp_path):
  code, summary = report(f"--out={tmp_path / 'report'}")
  assert code == 1 and "--workdir" in summary["error"]
  code, summary = report(f"--workdir={tmp_path}", f"--out={tmp_path / 'report'}")
  assert code == 1 and "metrics.jsonl" in summary["error"] and str(tmp_path) in summary["error"]
  code, summary = report(f"--clip_scores={tmp_path / 'nowhere'}", f"--out={tmp_path / 'report'}")
  assert code == 1 and "--clip_scores" in summary["error"]


def test_report_shows_planted_concepts_beside_the_explanations(tmp_path):
  concepts = tmp_path / "concepts"
  concepts.mkdir()
  metric = lambda mean: {"n": 2, "mean": mean, "median": mean, "ci95": [mean - 0.25, mean + 0.25]}
  (concepts / "concepts.json").write_text(json.dumps({
      "format": "concept-iou", "version": 1,
      "settings": {"threshold": 1e-5, "match_iou": 0.5, "grid": [4, 4], "covered": 0.5,
                   "min_images": 3, "random_draws": 10, "concepts": "images/concepts.jsonl"},
      "latents": {"scored": 2}, "metrics": {"iou": metric(0.625), "random_iou": metric(0.125)},
      "planted": 3, "matched": 1, "matched_random": 0,
      "concepts": {"shape:rectangle": {"latent": 7, "iou": 0.875, "random_iou": 0.25,
                                       "matched": True},
                   "colour:red": {"latent": 2, "iou": 0.375, "random_iou": 0.125,
                                  "matched": False},
                   "texture:flat": {"latent": None, "iou": None, "random_iou": None,
                                    "matched": False}}}))
  rows = [{"latent": 7, "concept": "shape:rectangle", "iou": 0.875, "random_iou": 0.25,
           "images": 8, "explanation": XSS},
          {"latent": 2, "concept": "colour:red", "iou": 0.375, "random_iou": 0.125, "images": 5,
           "explanation": None},
          {"latent": 9, "concept": "texture:flat", "iou": 0.9, "random_iou": 0.9, "images": 5,
           "explanation": None}]  # active everywhere: as good at random
  (concepts / "per_latent.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  out = tmp_path / "report"
  code, summary = report(f"--concepts={concepts}", f"--out={out}")
  assert code == 0, summary
  assert summary["sections"] == ["Ground truth", "Planted concepts (IoU)"]
  # The ground-truth row (also the dashboard's --headline) says the counts of concepts.json.
  headline = json.loads((out / "headline.json").read_text())["rows"]
  assert [(r["reached"], r["baseline"]) for r in headline] == [
      ("1/3 (0.3333)", "random placement 0/3 (0)")]
  page = (out / "report.html").read_text()
  assert "1 of 3 planted concepts are matched by some latent at IoU &gt;= 0.5" in page
  assert "(by the randomly placed maps: 0)" in page
  assert "<td>shape:rectangle</td><td>7</td><td>0.875</td><td>0.25</td><td>yes</td>" in page
  assert "<td>0.625</td><td>0.625</td><td>[0.375, 0.875]</td>" in page
  # Ranked by the gain over the random placement, the explanation (escaped) beside the concept.
  best = page.index("<td>7</td><td>shape:rectangle</td><td>0.875</td><td>0.25</td><td>&lt;script")
  assert best < page.index("<td>2</td><td>colour:red</td><td>0.375</td>") < page.index(
      "<td>9</td><td>texture:flat</td><td>0.9</td>")
  assert "<script" not in page and "<script" not in (out / "report.md").read_text()
  code, summary = report(f"--concepts={tmp_path / 'nowhere'}", f"--out={out}")
  assert code == 1 and summary["error"].startswith("--concepts: cannot read")


def test_report_shows_clip_and_grounded_iou_side_by_side(inputs, tmp_path):
  _, _, scores = inputs
  folders = []
  for method, (iou, random_iou) in (("patch", (0.375, 0.125)), ("paper", (0.25, 0.0625))):
    folder = tmp_path / f"grounded_{method}"
    folder.mkdir()
    (folder / "grounded_iou.json").write_text(json.dumps({
        "format": "grounded-iou", "version": 1,
        "settings": {"method": method, "grounding_dino": "/m/gd", "sam": "/m/sam",
                     "box_threshold": 0.35, "text_threshold": 0.25, "threshold": 1e-5,
                     "grid": [24, 24], "pixels": 336 if method == "paper" else None,
                     "random_draws": 10},
        "latents": {"selected": 3, "scored": 2}, "images": {"boxed": 7, "no box": 3},
        "metrics": {"iou": {"n": 2, "mean": iou, "median": iou, "ci95": [iou - 0.125, iou + 0.125]},
                    "random_iou": {"n": 2, "mean": random_iou, "median": random_iou,
                                   "ci95": None}}}))
    folders.append(str(folder))
  out = tmp_path / "report"
  code, summary = report(f"--clip_scores={scores}", f"--grounded_iou={','.join(folders)}",
                         f"--out={out}")
  assert code == 0, summary
  assert summary["sections"] == ["CLIP score", "IoU (GroundingDINO + SAM)"]
  page = (out / "report.html").read_text()
  assert "7 boxed, 3 no box" in page and "binarised at activation &gt; 1e-05" in page
  assert "Method paper (the paper&#x27;s computation)" in page and "squashed to 336 px" in page
  # This run's means with their intervals, next to the paper's CLIP scores; the paper's IoU only
  # beside method paper, whose numbers they are.
  assert ("<tr><td>CLIP score</td><td>25.5 [24.5, 26.5]</td><td>18.25 [17.25, 19.25]</td>"
          "<td>24.92</td><td>18.2</td></tr>") in page
  assert ("<tr><td>IoU, method patch</td><td>0.375 [0.25, 0.5]</td><td>0.125</td><td></td>"
          "<td></td></tr>") in page
  assert ("<tr><td>IoU, method paper</td><td>0.25 [0.125, 0.375]</td><td>0.0625</td>"
          "<td>0.31</td><td>0.005</td></tr>") in page