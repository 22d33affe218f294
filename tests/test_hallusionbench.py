"""HallusionBench: the official metrics on a hand-made question file (expected values worked out by
hand from the official utils.py rules), the rule and LLM judges, the file checks, and
eval.hallucination --task=hallusionbench end to end on a tiny LLaVA-NeXT, then re-scored."""

import json
import re
import subprocess
import sys

import pytest

import fakes
import steer_fixtures
from eval.tasks import hallusionbench
from interpret import jobs, prompts
from interpret.explainers import OpenAIExplainer

# (category, subcategory, set_id, figure_id, question_id, visual_input, gt_answer, answer, correct)
ROWS = [
    ("VD", "illusion", "0", "0", "0", "1", "1", "Yes, they are.", True),
    ("VD", "illusion", "0", "1", "0", "2", "0", "Yes.", False),
    ("VD", "illusion", "0", "0", "1", "1", "0", "No, not at all.", True),
    ("VD", "illusion", "0", "1", "1", "2", "1", "I cannot tell.", False),  # unclear on VD: wrong
    ("VS", "chart", "0", "0", "0", "0", "1", "yes", True),  # no figure: asked without an image
    ("VS", "chart", "0", "1", "0", "1", "1", "It is yes.", True),  # "yes" alone
    ("VS", "chart", "0", "2", "0", "2", "0", "No", True),
    ("VS", "map", "1", "0", "0", "0", "0", "Maybe.", True),  # unclear on VS without figure: right
    ("VS", "map", "1", "1", "0", "1", "1", "Well, yes and no.", False),  # both: unclear, a figure
    ("VD", "figure", "2", "0", "0", "1", "0", "no\n", True),
]
# By hand from the rows' correctness:
#   aAcc 7/10. Figures (VS figure 0 excluded): VD/illusion/0/0 (rows 1, 3) right, VD/illusion/0/1
#   (2, 4) wrong, VS/chart/0/1 right, VS/chart/0/2 right, VS/map/1/1 wrong, VD/figure/2/0 right:
#   4/6. Pairs: VD/illusion/0/q0 (1, 2) wrong, q1 (3, 4) wrong, VS/chart/0/q0 (5, 6, 7) right,
#   VS/map/1/q0 (8, 9) wrong, VD/figure/2/q0 right: 2/5. Easy pairs (visual_input 0/1): rows 1 | 3 |
#   5, 6 | 8, 9 | 10: 4/5. Hard pairs (visual_input 2): rows 2 | 4 | 7: 1/3.
EXPECTED = {"aAcc": 70.0, "fAcc": 400 / 6, "qAcc": 40.0, "easy": 80.0, "hard": 100 / 3,
            "questions": 10, "figures": 6, "pairs": 5}
EXPECTED_VD = {"aAcc": 60.0, "fAcc": 200 / 3, "qAcc": 100 / 3, "easy": 100.0, "hard": 0.0}
EXPECTED_VS = {"aAcc": 80.0, "fAcc": 200 / 3, "qAcc": 50.0, "easy": 50.0, "hard": 100.0}


def question_rows(image_names=None):
  rows = []
  for i, (cat, sub, set_id, fig, qid, visual, gt, _, _) in enumerate(ROWS):
    image = None if visual == "0" else (image_names[i % len(image_names)] if image_names
                                        else f"./{cat}/{sub}/{set_id}_{fig}.png")
    rows.append({"category": cat, "subcategory": sub, "visual_input": visual, "set_id": set_id,
                 "figure_id": fig, "sample_note": "x", "question_id": qid,
                 "question": f"Question {i}?", "gt_answer_details": f"Reference {i}.",
                 "gt_answer": gt, "filename": image})
  return rows


def write(path, rows):
  path.write_text(json.dumps(rows))
  return path


def test_official_metrics_on_a_hand_made_file(tmp_path):
  questions = hallusionbench.read_questions(write(tmp_path / "hb.json", question_rows()), "/img")
  assert questions[0].image.as_posix() == "/img/VD/illusion/0_0.png" and questions[4].image is None
  answers = [r[7] for r in ROWS]
  judged = hallusionbench.rule_codes(questions, answers)
  assert [j for _, j in judged] == ["yes", "yes", "no", "uncertain", "yes", "yes", "no",
                                    "uncertain", "uncertain", "no"]
  codes = [code for code, _ in judged]
  assert codes == ["1", "0", "1", "2", "1", "1", "1", "2", "2", "1"]
  assert [hallusionbench.is_correct(q, c) for q, c in zip(questions, codes)] == [r[8] for r in ROWS]
  scores = hallusionbench.scores(questions, codes)
  assert {k: scores[k] for k in EXPECTED} == pytest.approx(EXPECTED)
  for category, expected in (("VD", EXPECTED_VD), ("VS", EXPECTED_VS)):
    assert {k: scores["by_category"][category][k] for k in expected} == pytest.approx(expected)
  # An unclear answer counts only on VS questions without a figure.
  assert hallusionbench.is_correct(questions[7], "2") and not hallusionbench.is_correct(
      questions[0], "2") and not hallusionbench.is_correct(questions[5], "2")


@pytest.mark.parametrize("answer,judgment", [
    ("Yes, the circles are equal.", "yes"), ("No. There is no such bar.", "no"),
    ("no\n", "no"), ("  YES", "yes"), ("Yes, but there is no dog.", "yes"),  # the first word
    ("The answer is no.", "no"), ("It is yes, and no.", "uncertain"),
    ("The circles are not equal.", "uncertain"), ("", "uncertain"), ("Nope", "uncertain"),
])
def test_rule_judgment(answer, judgment):
  assert hallusionbench.rule_judgment(answer) == judgment


@pytest.mark.parametrize("reply,code", [
    ("correct", "1"), ("Incorrect.", "0"), ("The prediction is correct, not incorrect", "0"),
    ("unclear", "2"), ("I do not know", "2")])
def test_judge_reply_read_with_the_official_rule(reply, code):
  assert hallusionbench.reply_code(reply) == code


@pytest.mark.parametrize("change,message", [
    (lambda rows: rows[3].pop("question_id"), "row 4: no question_id"),
    (lambda rows: rows[1].update(gt_answer="yes"), "row 2: gt_answer 'yes'"),
    (lambda rows: rows[6].update(category="VX"), "row 7: category 'VX'"),
    (lambda rows: rows[2].update(filename=3), "row 3: filename 3"),
    (lambda rows: rows[9].update(category="VD", subcategory="illusion", set_id="0",
                                 question_id="0"), "row 10: same category/.* as row 1"),
])
def test_bad_rows_name_the_row(tmp_path, change, message):
  rows = question_rows()
  change(rows)
  with pytest.raises(hallusionbench.QuestionError, match=rf"hb.json {message}"):
    hallusionbench.read_questions(write(tmp_path / "hb.json", rows))


def test_the_rule_judge_needs_gt_answer(tmp_path):
  rows = question_rows()
  del rows[2]["gt_answer"]  # the official sample result file has none
  questions = hallusionbench.read_questions(write(tmp_path / "hb.json", rows))
  with pytest.raises(hallusionbench.QuestionError,
                     match=r"--questions=\S*hb.json row 3: no gt_answer"):
    hallusionbench.rule_codes(questions, ["Yes"] * len(rows))


def test_a_result_file_needs_every_prediction(tmp_path):
  rows = [{**row, "model_prediction": "Yes"} for row in question_rows()]
  rows[4]["model_prediction"] = None
  with pytest.raises(hallusionbench.QuestionError,
                     match=r"--predictions=\S*hb.json row 5: model_prediction is not a string"):
    hallusionbench.read_questions(write(tmp_path / "hb.json", rows), predictions=True)
  del rows[4]["model_prediction"]
  with pytest.raises(hallusionbench.QuestionError, match=r"row 5: no model_prediction"):
    hallusionbench.read_questions(write(tmp_path / "hb.json", rows), predictions=True)
  # The official sample result file has neither filename nor gt_answer: it can be re-scored (by
  # an LLM judge).
  rows = [{k: v for k, v in row.items() if k not in ("filename", "gt_answer")}
          for row in question_rows()]
  for row in rows:
    row["model_prediction"] = "Yes"
  questions = hallusionbench.read_questions(write(tmp_path / "hb.json", rows), predictions=True)
  assert len(questions) == 10 and all(q.image is None for q in questions)


class JudgeServer(fakes.FakeOpenAIServer):
  """Judges by the question's number: replies "correct" when ROWS marks the answer right."""

  @staticmethod
  def latent_of(body):
    return int(re.search(r"Question (\d+)\?", body["messages"][-1]["content"][0]["text"])[1])


def test_llm_judge_against_a_fake_server(tmp_path):
  questions = hallusionbench.read_questions(write(tmp_path / "hb.json", question_rows()))
  answers = [r[7] for r in ROWS]
  # Unclear for row 8 (VS without figure: still right), "incorrect" for the wrong ones.
  script = lambda i, attempt: fakes.reply(
      "unclear" if i == 7 else ("Correct." if ROWS[i][8] else "incorrect"))
  template = prompts.load_template(hallusionbench.DEFAULT_JUDGE_TEMPLATE)
  with JudgeServer(script) as server:
    client = OpenAIExplainer(server.url, None, None, timeout_s=10, max_tokens=8, temperature=0)
    judged = hallusionbench.llm_codes(questions, answers, client, template, tmp_path / "cache",
                                      jobs.JobSettings(concurrency=4))
    text = server.bodies[0]["messages"][-1]["content"][0]["text"]
    again = hallusionbench.llm_codes(questions, answers, client, template, tmp_path / "cache",
                                     jobs.JobSettings(concurrency=4))
    assert len(server.bodies) == len(ROWS)  # the second pass came from the cache
  assert again == judged
  codes = [code for code, _ in judged]
  assert codes[7] == "2" and [hallusionbench.is_correct(q, c) for q, c in
                              zip(questions, codes)] == [r[8] for r in ROWS]
  assert re.search(r"Question: Question \d\?\nReference answer: Reference \d\.\nPredicted "
                   r"answer: ", text)


def run_benchmark(*args):
  proc = subprocess.run([sys.executable, "-m", "eval.hallucination", *args], capture_output=True,
                        text=True, timeout=300)
  return proc, json.loads(proc.stdout.strip().splitlines()[-1])


def test_rescore_with_an_llm_judge(tmp_path):
  rows = [{**row, "model_prediction": r[7]} for row, r in zip(question_rows(), ROWS)]
  predictions = write(tmp_path / "HallusionBench_result.json", rows)
  script = lambda i, attempt: fakes.reply(
      "unclear" if i == 7 else ("Correct." if ROWS[i][8] else "incorrect"))
  with JudgeServer(script) as server:
    proc, summary = run_benchmark("--task=hallusionbench", f"--predictions={predictions}",
                                  f"--judge=openai:{server.url}", f"--out={tmp_path / 'out'}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert {k: summary[k] for k in ("aAcc", "fAcc", "qAcc", "easy", "hard")} == pytest.approx(
      {k: round(EXPECTED[k], 4) for k in ("aAcc", "fAcc", "qAcc", "easy", "hard")})
  result = json.loads((tmp_path / "out" / "results.json").read_text())
  assert result["judge"] == f"openai:{server.url}" and len(server.bodies) == len(ROWS)
  answers = [json.loads(line) for line in (tmp_path / "out" / "answers.jsonl").read_text()
             .splitlines()]
  assert [a["judgment"] for a in answers][6:8] == ["Correct.", "unclear"]
  assert len(list((tmp_path / "out" / "judge_cache").iterdir())) == len(ROWS)


def test_generate_write_the_official_file_and_rescore(tiny_model, synthetic_images, tmp_path):
  names = sorted(p.name for p in synthetic_images.iterdir())[:3]
  questions = write(tmp_path / "HallusionBench.json", question_rows(names))
  export = steer_fixtures.write_export(tmp_path / "sae", steer_fixtures.random_params(64))
  out = tmp_path / "out"
  proc, summary = run_benchmark(
      f"--model={tiny_model('llava_next')}", "--task=hallusionbench", f"--questions={questions}",
      f"--image_root={synthetic_images}", f"--sae={export}", "--latents=1", "--mode=add",
      "--strengths=0", "--positions=all", "--batch_size=4", "--max_new_tokens=3",
      "--dtype=float32", f"--out={out}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert summary["items"] == 10 and list(summary["runs"]) == ["plain", "add 0"]
  answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
  result = json.loads((out / "results.json").read_text())
  for run, name in zip(result["runs"], ["HallusionBench_result.json",
                                        "HallusionBench_result_add_0.json"]):
    official = json.loads((out / name).read_text())
    mine = [a for a in answers if a["run"] == run["label"]]
    # The question rows as they were, plus the answers.
    assert [{k: v for k, v in r.items() if k != "model_prediction"} for r in official] == \
        question_rows(names)
    assert [r["model_prediction"] for r in official] == [a["answer"] for a in mine]
    assert [a["judgment"] for a in mine] == [hallusionbench.rule_judgment(a["answer"])
                                             for a in mine]

  # Re-scoring the steered run's file, without a model, gives that run's metrics.
  proc, rescored = run_benchmark("--task=hallusionbench", f"--predictions={out / name}",
                                 f"--out={tmp_path / 'rescored'}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  metrics = ("aAcc", "fAcc", "qAcc", "easy", "hard")
  assert {k: rescored[k] for k in metrics} == {k: round(result["runs"][1][k], 4) for k in metrics}
  assert json.loads((tmp_path / "rescored" / "results.json").read_text())["runs"] == [
      {**result["runs"][1], "label": "predictions"}]
