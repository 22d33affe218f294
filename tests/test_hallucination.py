"""POPE parsing and metrics, and eval.hallucination end to end on a tiny LLaVA-NeXT."""

import json
import subprocess
import sys

import numpy as np
import pytest

import steer_fixtures
from eval.tasks import chair, pope


@pytest.mark.parametrize("answer,parsed", [
    ("Yes, there is a cat in the image.", "yes"),
    ("No, there is no cat.", "no"),
    ("No", "no"),
    ("no", "no"),
    ("There is not a dog", "no"),
    ("Yes. There is no dog next to it.", "yes"),  # only the first sentence counts
    ("I see a cat, no dog", "no"),
    ("Nope", "yes"),  # not one of the words
    ("NO.", "yes"),  # the official rule is case-sensitive
    ("", "yes"),
    ("No\n", "no"),  # whitespace around a word does not hide it (the official split on " " does)
    ("\n No", "no"),
    ("There is\nno cat", "no"),
    ("Yes\n", "yes"),
])
def test_parse_answer_follows_the_official_rule(answer, parsed):
  assert pope.parse_answer(answer) == parsed


def test_metrics_on_a_hand_made_list():
  labels = ["yes", "yes", "yes", "no", "no", "no", "no", "yes", "no", "yes"]
  preds = ["yes", "no", "yes", "yes", "no", "no", "yes", "yes", "no", "no"]
  m = pope.metrics(preds, labels)
  # By hand: TP = 3 (rows 0, 2, 7), FP = 2 (3, 6), TN = 3 (4, 5, 8), FN = 2 (1, 9).
  assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (3, 2, 3, 2)
  assert m["accuracy"] == pytest.approx(0.6) and m["precision"] == pytest.approx(0.6)
  assert m["recall"] == pytest.approx(0.6) and m["f1"] == pytest.approx(0.6)
  assert m["yes_ratio"] == pytest.approx(0.5)

  # Random lists against a vectorised computation.
  rng = np.random.default_rng(0)
  p, t = rng.random(500) < 0.6, rng.random(500) < 0.5
  m = pope.metrics(["yes" if v else "no" for v in p], ["yes" if v else "no" for v in t])
  precision, recall = (p & t).sum() / p.sum(), (p & t).sum() / t.sum()
  assert m["accuracy"] == pytest.approx((p == t).mean())
  assert m["precision"] == pytest.approx(precision) and m["recall"] == pytest.approx(recall)
  assert m["f1"] == pytest.approx(2 / (1 / precision + 1 / recall))
  assert m["yes_ratio"] == pytest.approx(p.mean())
  assert pope.metrics(["no", "no"], ["yes", "no"])["precision"] == 0.0  # no "yes" at all


def test_read_questions(tmp_path):
  rows = [{"question_id": 1, "image": "a.png", "text": "Is there a cat?", "label": "yes"},
          {"image": "b.png", "question": "Is there a dog?", "label": "No"}]
  path = tmp_path / "q.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
  questions = pope.read_questions(path, "/images")
  assert [(str(q.image), q.question, q.label, q.question_id) for q in questions] == [
      ("/images/a.png", "Is there a cat?", "yes", 1),
      ("/images/b.png", "Is there a dog?", "no", None)]
  assert pope.read_questions(path)[0].image == tmp_path / "a.png"
  path.write_text(json.dumps(rows[0]) + "\n" + json.dumps({**rows[1], "label": "maybe"}) + "\n")
  with pytest.raises(pope.QuestionError, match=r"q.jsonl:2: label 'maybe'"):
    pope.read_questions(path)


def run_benchmark(*args):
  proc = subprocess.run([sys.executable, "-m", "eval.hallucination", *args], capture_output=True,
                        text=True, timeout=300)
  return proc, json.loads(proc.stdout.strip().splitlines()[-1])


def test_benchmark_end_to_end_with_and_without_steering(tiny_model, synthetic_images, tmp_path):
  model = tiny_model("llava_next")
  names = sorted(p.name for p in synthetic_images.iterdir())[:3]
  rows = [{"question_id": i, "image": names[i % 3], "text": f"Is there a {obj} in the image?",
           "label": "yes" if i % 2 else "no"} for i, obj in enumerate(["cat", "dog", "car", "cup"])]
  questions = tmp_path / "pope.jsonl"
  questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
  export = steer_fixtures.write_export(tmp_path / "sae", steer_fixtures.random_params(64))
  out = tmp_path / "out"
  proc, summary = run_benchmark(
      f"--model={model}", f"--questions={questions}", f"--image_root={synthetic_images}",
      f"--sae={export}", "--latents=1,2", "--mode=add", "--strengths=0,80", "--positions=all",
      "--batch_size=3", "--max_new_tokens=4", "--dtype=float32", f"--out={out}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert summary["ok"] and summary["items"] == 4
  assert list(summary["runs"]) == ["plain", "add 0", "add 80"]

  result = json.loads((out / "results.json").read_text())
  answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
  by_run = {run["label"]: [a for a in answers if a["run"] == run["label"]]
            for run in result["runs"]}
  for run in result["runs"]:  # the stored metrics are those of the stored answers
    mine = by_run[run["label"]]
    assert [a["parsed"] for a in mine] == [pope.parse_answer(a["answer"]) for a in mine]
    assert run == {"label": run["label"],
                   **pope.metrics([a["parsed"] for a in mine], [r["label"] for r in rows])}
  plain, zero, strong = ([a["answer"] for a in by_run[label]] for label in summary["runs"])
  assert zero == plain  # adding 0 x the directions changes nothing
  assert strong != plain
  table = (out / "results.md").read_text()
  assert table.startswith("| run | accuracy") and "| add 80 |" in table

  proc, summary = run_benchmark(f"--model={model}", f"--questions={questions}",
                                f"--out={tmp_path / 'bad'}", "--dtype=float32")
  assert proc.returncode == 1 and "row 1: image" in summary["error"]  # images not under the root


def test_chair_task_end_to_end(tiny_model, synthetic_images, tmp_path):
  names = sorted(p.name for p in synthetic_images.iterdir())[:2]
  items = tmp_path / "captions.jsonl"
  rows = [{"image": names[0], "objects": ["circle", "square"]},
          {"image": names[1], "objects": ["line"], "prompt": "Describe."}]
  items.write_text("".join(json.dumps(r) + "\n" for r in rows))
  out = tmp_path / "out"
  proc, summary = run_benchmark(
      f"--model={tiny_model('llava')}", "--task=chair", f"--questions={items}",
      f"--image_root={synthetic_images}", "--max_new_tokens=6", "--dtype=float32", f"--out={out}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert summary["ok"] and summary["items"] == 2 and set(summary["runs"]) == {"plain"}
  answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
  vocabulary = chair.make_vocabulary({"circle": "circle", "square": "square", "line": "line"})
  expected = chair.scores([a["answer"] for a in answers], [tuple(a["objects"]) for a in answers],
                          vocabulary)
  assert json.loads((out / "results.json").read_text())["runs"] == [{"label": "plain", **expected}]
  header = "| run | chair_s | chair_i | recall | length |"
  assert (out / "results.md").read_text().startswith(header)
