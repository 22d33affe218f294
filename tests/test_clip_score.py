"""eval.clip_score against a direct computation with a tiny open_clip model: the paper's score, the
random and shuffled baselines, the held-out AUROC, exclusions, label refinement through a fake OpenAI
server, the embedding cache, and the files the dashboard and the report read."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eval import tiny_clip
from eval.metrics import scoring, stats
from eval.models import clip, refine
from interpret import jobs, prompts
from interpret.explainers import OpenAIExplainer
import fakes

REPO = Path(__file__).resolve().parents[1]
SEED, DRAWS, NEGATIVES, SHOWN = 3, 4, 6, 3
# Latent 7 has no top image (fakes.write_topacts); 3, 4 and 5 have no usable explanation.
STATUSES = {0: "ok", 1: "ok", 2: "ok", 3: "parse_error", 4: "unable", 5: "failed", 6: "ok", 7: "ok"}


class LabelServer(fakes.FakeOpenAIServer):
  """The fake OpenAI server, for text-only refinement prompts: the latent is read from the text."""

  @staticmethod
  def latent_of(body):
    text = body["messages"][-1]["content"][0]["text"]
    return int(re.findall(r"pattern number (\d+)", text)[-1])


def label_script(latent, attempt):
  if latent == 1:
    return fakes.reply("a label without the tag")  # parse_error: excluded
  if latent == 2 and attempt == 1:
    return ("status", 500)  # retried
  return fakes.reply(f"Thinking.\n[ANSWER] label {latent}")


def run_command(module, *args):
  result = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
  return result.returncode, json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("clip_score")
  topacts = fakes.write_topacts(root / "topacts", num_latents=8, top_n=6)
  # Noise instead of the fakes' solid colours: distinct embeddings, so no cosines tie by accident.
  rng = np.random.default_rng(0)
  for path in (topacts / "images").glob("*.png"):
    noise = rng.integers(0, 256, (24 + int(rng.integers(0, 16)), 32, 3), np.uint8)
    Image.fromarray(noise).save(path)
  records = []
  for i, status in STATUSES.items():
    record = {"latent": i, "status": status, "model": "fake", "raw": "", "attempts": 1,
              "cached": False, "error": None, "images": list(range(i, i + SHOWN)),
              "explanation": f"pattern number {i}" if status == "ok" else None}
    if i == 6:
      del record["images"]  # an explanation from elsewhere: --shown says what the explainer saw
    records.append(record)
  explanations = root / "explanations.jsonl"
  explanations.write_text("".join(json.dumps(r) + "\n" for r in records))
  clip_model = tiny_clip.save(root / "tiny_clip")
  common = [f"--topacts={topacts}", f"--explanations={explanations}", f"--clip_model={clip_model}",
            f"--shown={SHOWN}", f"--random_draws={DRAWS}", f"--heldout_negatives={NEGATIVES}",
            f"--seed={SEED}", "--bootstrap=200", "--batch_size=5", "--workers=2",
            f"--embedding_cache={root / 'embeddings'}"]
  return {"root": root, "topacts": topacts, "clip_model": clip_model, "common": common}


@pytest.fixture(scope="module")
def reference(setup):
  """Unit-norm float64 embeddings computed with open_clip directly, in one batch per tower."""
  import open_clip
  import torch
  model, _, preprocess = open_clip.create_model_and_transforms(setup["clip_model"])
  tokenizer = open_clip.get_tokenizer(setup["clip_model"])
  table = [json.loads(line) for line in (setup["topacts"] / "images.jsonl").read_text().splitlines()]
  pool = np.array([r["id"] for r in table])
  pixels = torch.stack([preprocess(Image.open(setup["topacts"] / r["source"]).convert("RGB"))
                        for r in table])
  with torch.no_grad():
    images = model.encode_image(pixels).double().numpy()
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)

  def texts(strings):
    with torch.no_grad():
      return unit(model.encode_text(tokenizer(strings)).double().numpy())

  return {"pool": pool, "images": dict(zip(pool.tolist(), unit(images))), "texts": texts}


def expected_scores(reference, latent, text, top):
  """The metrics of one latent, computed from the reference embeddings by the documented recipe."""
  t = reference["texts"]([text])[0]
  cos = lambda ids: np.array([reference["images"][int(i)] @ t for i in ids])
  score = lambda ids: float(np.mean(100 * np.maximum(cos(ids), 0)))
  shown, pool = top[:SHOWN], reference["pool"]
  rng = np.random.default_rng([SEED, latent, 0])  # the seeding contract of eval/metrics/scoring.py
  drawn = np.concatenate([pool[rng.choice(len(pool), SHOWN, replace=False)] for _ in range(DRAWS)])
  rng = np.random.default_rng([SEED, latent, 1])
  candidates = pool[~np.isin(pool, top)]
  negatives = candidates[rng.choice(len(candidates), NEGATIVES, replace=False)]
  pos, neg = cos(top[SHOWN:]), cos(negatives)
  pairs = [(p > n) + 0.5 * (p == n) for p in pos for n in neg]  # brute force, not rank sums
  return {"clip_score": score(shown), "random_baseline": score(drawn),
          "heldout_auroc": float(np.mean(pairs)), "shown": shown}


def read_rows(out):
  lines = (out / "per_latent.jsonl").read_text().splitlines()
  return {r["latent"]: r for r in map(json.loads, lines)}


def test_scores_match_a_direct_computation(setup, reference):
  out = setup["root"] / "scores"
  code, summary, stderr = run_command("eval.clip_score", *setup["common"], f"--out={out}")
  assert code == 0, stderr[-3000:]
  assert summary["scored"] == 4 and summary["excluded"] == {"failed": 1, "parse_error": 1,
                                                            "unable": 1}
  rows = read_rows(out)
  assert sorted(rows) == [0, 1, 2, 3, 4, 5, 6]  # 7: no top image
  for i in (3, 4, 5):
    assert rows[i]["excluded"] == STATUSES[i] and rows[i]["clip_score"] is None
  top = {i: np.arange(i, i + 6) for i in rows}  # fakes.write_topacts: latent i's top images
  for i in (0, 1, 2, 6):
    want = expected_scores(reference, i, f"pattern number {i}", top[i])
    for name in ("clip_score", "random_baseline", "heldout_auroc"):
      assert rows[i][name] == pytest.approx(want[name], abs=1e-3), (i, name)

  # Shuffled: each latent's shown images against exactly one other latent's explanation, all
  # explanations used once (a derangement).
  scored = [0, 1, 2, 6]
  texts = reference["texts"]([f"pattern number {j}" for j in scored])
  partner = {}
  for i in scored:
    images = np.stack([reference["images"][int(k)] for k in top[i][:SHOWN]])
    candidates = {j: float(np.mean(100 * np.maximum(images @ t, 0))) for j, t in zip(scored, texts)}
    matches = [j for j, v in candidates.items() if abs(v - rows[i]["shuffled_baseline"]) < 1e-3]
    assert len(matches) == 1, (i, candidates, rows[i]["shuffled_baseline"])
    partner[i] = matches[0]
  assert sorted(partner.values()) == scored and all(partner[i] != i for i in scored)

  result = json.loads((out / "clip_scores.json").read_text())
  assert result["skipped_no_images"] == 1 and result["images"]["embedded"] == 14
  for name in scoring.SCORE_NAMES:
    metric = result["metrics"][name]
    assert metric["mean"] == pytest.approx(np.mean([rows[i][name] for i in scored]))
    assert metric["ci95"][0] <= metric["mean"] <= metric["ci95"][1]
  differences = [rows[i]["clip_score"] - rows[i]["random_baseline"] for i in scored]
  assert result["metrics"]["score_minus_random"]["median"] == pytest.approx(np.median(differences))
  assert (out / "score_distributions.png").read_bytes()[:4] == b"\x89PNG"

  # The dashboard reads per_latent.jsonl as its --scores file, and the report renders the run.
  check = subprocess.run([sys.executable, "-c", "import json, sys; from interpret.dashboard import "
                          "load_scores; print(json.dumps(load_scores(sys.argv[1])))",
                          str(out / "per_latent.jsonl")], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
  assert check.returncode == 0, check.stderr[-2000:]
  dashboard_scores = json.loads(check.stdout)
  assert set(dashboard_scores["0"]) == set(scoring.SCORE_NAMES) and dashboard_scores["4"] == {}
  assert dashboard_scores["0"]["clip_score"] == rows[0]["clip_score"]
  code, report, stderr = run_command("eval.report", f"--clip_scores={out}",
                                     f"--out={setup['root'] / 'report'}")
  assert code == 0, stderr[-2000:]
  page = (setup["root"] / "report" / "report.md").read_text()
  assert f"{result['metrics']['clip_score']['mean']:.4g}" in page and "24.92" in page


def test_refined_labels_and_embedding_cache(setup, reference):
  out = setup["root"] / "refined"
  with LabelServer(label_script) as server:
    code, summary, stderr = run_command("eval.clip_score", *setup["common"], f"--out={out}",
                                        f"--refine=openai:{server.url}", "--max_retries=2")
  assert code == 0, stderr[-3000:]
  assert summary["scored"] == 3 and summary["excluded"]["refine_parse_error"] == 1
  rows = read_rows(out)
  assert rows[1]["excluded"] == "refine_parse_error" and rows[0]["label"] == "label 0"
  assert server.requests[2] == 2  # one 500, one retry
  want = expected_scores(reference, 0, "label 0", np.arange(0, 6))
  assert rows[0]["clip_score"] == pytest.approx(want["clip_score"], abs=1e-3)
  result = json.loads((out / "clip_scores.json").read_text())
  assert result["images"]["embedded"] == 0  # every image came from the first run's cache
  assert result["refine"]["model"] == "fake-model" and result["refine"]["retries"] == 1
  labels = [json.loads(line) for line in (out / "labels.jsonl").read_text().splitlines()]
  assert {r["latent"]: r["status"] for r in labels} == {0: "ok", 1: "parse_error", 2: "ok", 6: "ok"}


def test_refinement_resumes_and_redoes_changed_explanations(tmp_path):
  template = prompts.load_template(refine.DEFAULT_TEMPLATE)
  settings = jobs.JobSettings(concurrency=2, max_retries=1, backoff_s=0.01)
  texts = {i: f"pattern number {i}" for i in (0, 2, 3)}
  with LabelServer(label_script) as server:
    client = OpenAIExplainer(server.url, None, None, timeout_s=5.0, max_tokens=20, temperature=0.0)
    records, summary = refine.refine(texts, template, client, tmp_path, settings)
    assert {i: r["label"] for i, r in records.items()} == {0: "label 0", 2: "label 2", 3: "label 3"}
    assert [p["type"] for p in server.bodies[0]["messages"][1]["content"]] == ["text"]
    before = sum(server.requests.values())
    _, summary = refine.refine(texts, template, client, tmp_path, settings)
    assert summary["refined"] == 0 and sum(server.requests.values()) == before
    texts[3] = "pattern number 3, now longer"  # a new explanation gets a new label
    _, summary = refine.refine(texts, template, client, tmp_path, settings)
    assert summary["refined"] == 1 and server.requests[3] == 2


def test_parse_label():
  assert refine.parse_label("blah\n[ANSWER] Honda vehicles") == ("ok", "Honda vehicles")
  assert refine.parse_label("[ANSWER]: a\n**[ANSWER]:** \"dog ears\"") == ("ok", "dog ears")
  assert refine.parse_label("no tag here") == ("parse_error", None)
  assert refine.parse_label("[ANSWER]   ") == ("parse_error", None)


def test_auroc_equals_pairwise_count():
  rng = np.random.default_rng(1)
  for _ in range(100):  # small integers: many ties
    pos = rng.integers(0, 5, rng.integers(1, 8)).astype(float)
    neg = rng.integers(0, 5, rng.integers(1, 8)).astype(float)
    pairs = [(p > n) + 0.5 * (p == n) for p in pos for n in neg]
    assert stats.auroc(pos, neg) == pytest.approx(np.mean(pairs), abs=1e-12)


def test_bootstrap_is_seeded_and_contains_the_mean():
  values = np.random.default_rng(2).gamma(2.0, 3.0, 300)
  first = stats.summarize(list(values) + [None], resamples=500, seed=7)
  assert first == stats.summarize(values, resamples=500, seed=7)
  assert first["n"] == 300 and first["ci95"][0] < values.mean() < first["ci95"][1]
  assert first["ci95"] != stats.summarize(values, resamples=500, seed=8)["ci95"]
  assert stats.summarize([None], 100, 0) == {"n": 0, "mean": None, "median": None, "ci95": None}


def test_derangement_has_no_fixed_point():
  for n in (2, 3, 10):
    perm = scoring.derangement(n, seed=n)
    assert sorted(perm) == list(range(n)) and not np.any(perm == np.arange(n))
    assert np.array_equal(perm, scoring.derangement(n, seed=n))
  assert scoring.derangement(1, seed=0) is None


def test_unloadable_clip_model_names_the_flag(tmp_path):
  with pytest.raises(clip.ClipError, match="--clip_model=local-dir:"):
    clip.load(f"local-dir:{tmp_path / 'missing'}", None)


def test_paper_refine_prompt_is_read_from_a_clone(tmp_path):
  # A clone's label_refiner.py as the paper writes it: the module is never imported (its imports
  # are not installed here), its PROMPT string is read and {description} becomes {explanation}.
  source = tmp_path / refine.PAPER_REFINER
  source.parent.mkdir(parents=True)
  source.write_text('import sglang_that_is_not_installed\n\nPROMPT = """\\\n[GUIDELINES]\nExtract.\n'
                    '[Description]\n{description}\n"""\n\nclass LabelRefiner:\n  pass\n')
  template = refine.load_template(f"paper:{tmp_path}")
  assert template.system == ""  # their client sends one user message
  assert template.user == "[GUIDELINES]\nExtract.\n[Description]\n{explanation}\n"
  assert refine.render(template, "Dogs.").user.endswith("[Description]\nDogs.\n")
  assert refine.load_template(None) == prompts.load_template(refine.DEFAULT_TEMPLATE)
  with pytest.raises(prompts.TemplateError, match=r"--refine_template=paper:.*cannot read"):
    refine.load_template(f"paper:{tmp_path / 'nowhere'}")
