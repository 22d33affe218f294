"""eval.sweep_report: every SAE of a sweep on one page, its numbers recomputed from metrics.jsonl,
its Pareto frontier by brute force; names escaped; bad input named in one line."""

import html
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import synthetic

from eval.reports import sweep

REPO = Path(__file__).resolve().parents[1]
XSS = "<script>alert(1)</script>|$x$"
# Trained for real: (name, extra flags). Logged every step, so the last 10% is several rows.
RUNS = (("k4", ["--k=4", "--steps=20"]), (XSS, ["--k=8", "--lr=1e-3", "--steps=30"]),
        ("k2", ["--k=2", "--steps=20"]))


def sweep_report(*args):
  result = subprocess.run([sys.executable, "-m", "eval.sweep_report", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
  return result.returncode, json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A sweep folder: three members trained by sae_jax.train (in parallel), a BatchTopK Matryoshka
  member (a trained run's metrics with the inference and prefix columns those runs add), one that
  has written its flags but no metrics yet and one whose workdir does not exist yet."""
  root = tmp_path_factory.mktemp("sweep")
  store = synthetic.write_sparse_store(root / "store", num_shards=4, d_model=16)
  jobs = []
  for i, (_, extra) in enumerate(RUNS):
    cmd = [sys.executable, "-m", "sae_jax.train", f"--store={store}", f"--workdir={root / str(i)}",
           "--num_latents=64", "--batch_size=64", "--log_every=1", "--lr_warmup_steps=2",
           "--dead_tokens=256", *extra]
    jobs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  for job in jobs:
    out, err = job.communicate(timeout=300)
    assert job.returncode == 0, out[-1000:] + err[-3000:]
  batchtopk = root / "batchtopk"
  shutil.copytree(root / "0", batchtopk)
  run = json.loads((batchtopk / "run.json").read_text())
  run["sae"].update(architecture="batchtopk", matryoshka_prefixes=[16, 64])
  (batchtopk / "run.json").write_text(json.dumps(run))
  rows = [json.loads(line) for line in (batchtopk / "metrics.jsonl").read_text().splitlines()]
  learned = len(rows) - len(rows) // 20  # the threshold is learned within the averaged tail
  for i, r in enumerate(rows):
    r.update(fvu_prefix_16=r["fvu"] * 2, fvu_prefix_64=r["fvu"])
    if i >= learned:
      r.update(inference_fvu=r["fvu"] * 0.5, inference_l0=3.0 + r["step"] / 64)
  (batchtopk / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  (root / "started").mkdir()
  shutil.copy(root / "0" / "flags.json", root / "started")
  members = [{"name": name, "workdir": str(root / str(i)), "overrides": {"x": i}}
             for i, (name, _) in enumerate(RUNS)]
  members += [{"name": "batchtopk", "workdir": "batchtopk", "overrides": {}},  # relative
              {"name": "started", "workdir": str(root / "started"), "overrides": {}},
              {"name": "queued", "workdir": str(root / "queued"), "overrides": {}}]
  (root / "sweep.json").write_text(json.dumps({"members": members}))
  return root


def expected(workdir: Path) -> dict:
  """A member's numbers computed from its files alone: float64 means of the last 10% rows."""
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  tail = rows[-math.ceil(len(rows) / 10):]
  mean = lambda key: float(np.mean(np.array([r[key] for r in tail], np.float64)))
  # A row's inference-mode number where it has one (a learned threshold), else its training one.
  either = lambda key: float(np.mean(np.array([r.get(f"inference_{key}", r[key]) for r in tail],
                                              np.float64)))
  flags = json.loads((workdir / "flags.json").read_text())
  return {"fvu": either("fvu"), "l0": either("l0"),
          "dead": mean("dead_fraction"), "tokens_per_s": mean("tokens_per_s"),
          "tokens": rows[-1]["step"] * flags["batch_size"], "rows": len(tail),
          "k": flags["k"], "lr": flags["resolved"]["lr"],
          "prefix": {w: mean(f"fvu_prefix_{w}") for w in (16, 64) if f"fvu_prefix_{w}" in rows[-1]}}


def table(page: str) -> dict[str, dict[str, str]]:
  """The SAE table of the HTML page: name -> {header: cell text}."""
  tables = re.findall(r"<table>(.*?)</table>", page, re.S)
  [sae_table] = [t for t in tables if "<th>dead fraction</th>" in t]
  rows = [[html.unescape(c) for c in re.findall(r"<t[dh]>(.*?)</t[dh]>", row)]
          for row in re.findall(r"<tr>(.*?)</tr>", sae_table, re.S)]
  return {row[0]: dict(zip(rows[0], row)) for row in rows[1:]}


def brute_pareto(points: dict) -> set:
  """Names whose (l0, fvu) no other point matches or beats on both, beating on one."""
  return {a for a, (l0, fvu) in points.items()
          if not any(l0b <= l0 and fvub <= fvu and (l0b, fvub) != (l0, fvu)
                     for b, (l0b, fvub) in points.items() if b != a)}


def test_sweep_page_numbers_and_frontier_come_from_the_metrics(runs, tmp_path):
  out = tmp_path / "report"
  code, summary = sweep_report(f"--sweep={runs}", f"--out={out}")
  assert code == 0, summary
  assert summary["members"] == 6 and summary["no_metrics"] == ["started", "queued"]
  for png in ("fvu_vs_l0.png", "sweep_curves.png"):
    assert (out / png).read_bytes()[:4] == b"\x89PNG"
  cells = table((out / "sweep.html").read_text())
  workdirs = {name: runs / str(i) for i, (name, _) in enumerate(RUNS)}
  workdirs["batchtopk"] = runs / "batchtopk"
  points = {}
  for name, workdir in workdirs.items():
    want, row = expected(workdir), cells[name]
    for header, key in (("FVU", "fvu"), ("L0", "l0"), ("dead fraction", "dead"), ("lr", "lr")):
      assert float(row[header]) == pytest.approx(want[key], rel=5e-4, abs=1e-12), (name, header)
    assert int(row["tokens/s"]) == round(want["tokens_per_s"])
    assert (int(row["tokens seen"]), int(row["rows"]), int(row["k"]), int(row["width"])) == (
        want["tokens"], want["rows"], want["k"], 64)
    assert row["rows"] != "1"  # a mean over several rows, not the last one
    for width, value in want["prefix"].items():
      assert float(row[f"FVU of the first {width}"]) == pytest.approx(value, rel=5e-4)
    points[name] = (want["l0"], want["fvu"])
  assert (cells["batchtopk"]["architecture"], cells["batchtopk"]["FVU, L0 of"]) == (
      "batchtopk matryoshka", "inference")
  assert (cells["k4"]["architecture"], cells["k4"]["FVU, L0 of"]) == ("topk", "training")
  assert cells["k4"]["FVU of the first 16"] == "" and cells["k4"]["flags"] == "--x=0"
  front = brute_pareto(points)
  assert {n for n, row in cells.items() if row["Pareto"] == "yes"} == front == set(
      summary["pareto"])
  for name in ("started", "queued"):
    assert cells[name]["tokens seen"] == "no metrics yet" and cells[name]["FVU"] == ""
  assert cells["started"]["k"] == str(json.loads((runs / "0" / "flags.json").read_text())["k"])


def test_workdirs_trained_separately_and_the_page_escapes_names(runs, tmp_path):
  out = tmp_path / "report"
  code, summary = sweep_report(f"--workdirs={runs / '0'},{runs / 'batchtopk'}", f"--out={out}")
  assert code == 0, summary
  cells = table((out / "sweep.html").read_text())
  assert set(cells) == {"0", "batchtopk"}
  assert float(cells["0"]["FVU"]) == pytest.approx(expected(runs / "0")["fvu"], rel=5e-4)
  # The sweep's member names are files' text: escaped in both pages.
  sweep_report(f"--sweep={runs}", f"--out={out}")
  page, markdown = (out / "sweep.html").read_text(), (out / "sweep.md").read_text()
  for text in (page, markdown):
    assert "<script" not in text
  assert "&lt;script&gt;alert(1)&lt;/script&gt;|$x$" in page
  assert "&lt;script&gt;alert(1)&lt;/script&gt;\\|\\$x\\$" in markdown


def test_pareto_equals_brute_force_with_ties():
  rng = np.random.default_rng(0)
  for n in (1, 2, 5, 30, 60):
    # Few distinct values: many ties in L0 (TopK's L0 is k), in FVU and in both.
    points = [(float(a), float(b)) for a, b in rng.integers(0, 6, size=(n, 2))]
    on = sweep.pareto(points)
    assert {i for i, yes in enumerate(on) if yes} == brute_pareto(dict(enumerate(points)))


@pytest.mark.parametrize("case", ["missing", "not_json", "not_a_sweep", "twice", "workdir",
                                  "nothing"])
def test_bad_input_is_one_line_naming_the_path(runs, tmp_path, case):
  path = tmp_path / "sweep.json"
  args = [f"--sweep={path}"]
  if case == "not_json":
    path.write_text('{"members": [')
  elif case == "not_a_sweep":
    path.write_text(json.dumps({"members": [{"name": "a"}]}))
  elif case == "twice":
    path.write_text(json.dumps({"members": [{"name": "a", "workdir": "x"}] * 2}))
  elif case == "workdir":
    path, args = tmp_path / "nowhere", [f"--workdirs={runs / '0'},{tmp_path / 'nowhere'}"]
  elif case == "nothing":
    args = []
  code, summary = sweep_report(*args, f"--out={tmp_path / 'report'}")
  assert code == 1 and summary["ok"] is False and "\n" not in summary["error"]
  if case == "nothing":
    assert "--sweep" in summary["error"] and "--workdirs" in summary["error"]
  else:
    assert str(path) in summary["error"], summary["error"]
  assert not (tmp_path / "report" / "sweep.html").exists()

