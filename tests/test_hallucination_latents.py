"""Latents that separate hallucinated from correct answers: AUROC ranking, the activations recorded
from the model, the paired bootstrap, and `python -m eval.hallucination_latents` end to end."""

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import steer_fixtures
from eval import latent_separation as sep
from eval import pope, stats
from harvest import llava
from interpret.sae import SAE


def pair_count_auroc(positives, negatives) -> float:
  """Mann-Whitney U by counting every pair, in float64: wins + ties / 2."""
  pairs = list(itertools.product(positives, negatives))
  return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)


def test_latent_aurocs_equal_pair_counting():
  rng = np.random.default_rng(0)
  activations = rng.integers(0, 4, (40, 6)).astype(np.float32)  # small integers: many ties
  activations[:, 5] = 0  # never fires
  activations[3, :] = np.nan  # an item without an image
  hallucinated = rng.random(40) < 0.4
  got = sep.latent_aurocs(activations, hallucinated)
  keep = np.arange(40) != 3
  for latent in range(5):
    column, labels = activations[keep, latent], hallucinated[keep]
    assert got[latent] == pytest.approx(pair_count_auroc(column[labels], column[~labels]),
                                        abs=1e-12)
  assert np.isnan(got[5])


def test_a_planted_latent_ranks_first():
  rng = np.random.default_rng(1)
  hallucinated = np.arange(60) % 3 == 0
  activations = rng.exponential(1.0, (60, 50)) * (rng.random((60, 50)) < 0.3)
  activations[:, 17] = rng.exponential(1.0, 60) + 2.0 * hallucinated  # higher on hallucinated
  activations[:, 4] = rng.exponential(1.0, 60) + 2.0 * ~hallucinated  # higher on correct
  aurocs = sep.latent_aurocs(activations, hallucinated)
  assert sep.top_latents(aurocs, 3, "hallucinated")[0] == 17
  assert sep.top_latents(aurocs, 3, "correct")[0] == 4
  never = np.full(50, np.nan)
  never[[2, 9]] = [0.2, 0.7]
  assert sep.top_latents(never, 3, "hallucinated")[:2] == [9, 2]  # NaN (never fired) last
  assert sep.top_latents(never, 3, "correct")[:2] == [2, 9]


def test_split_is_a_seeded_partition():
  found, held = sep.split_items(11, 0.5, seed=3)
  assert len(found) == 6 and sorted([*found, *held]) == list(range(11))
  again = sep.split_items(11, 0.5, seed=3)
  assert (again[0] == found).all() and (sep.split_items(11, 0.5, seed=4)[0] != found).any()


def test_paired_bootstrap_by_hand():
  # Steering fixes item 1 of 2 and changes nothing else: each resample's change in accuracy is the
  # share of item 1 in it, which is 0 (both picks item 0, chance 1/4), 1/2 or 1 (chance 1/4), so
  # the 2.5th and 97.5th percentiles are 0 and 1.
  plain = {"correct": np.array([True, False])}
  steered = {"correct": np.array([True, True])}
  change = sep.compare(plain, steered, resamples=4000, seed=0)["accuracy"]
  assert change == {"plain": 0.5, "steered": 1.0, "delta": 0.5, "ci95": [0.0, 1.0]}
  # Pairing: the same answers give exactly no change in every resample.
  rng = np.random.default_rng(0)
  same = {"correct": rng.random(50) < 0.5}
  assert sep.compare(same, same, 200, 0)["accuracy"]["ci95"] == [0.0, 0.0]
  # The statistic sees the same indices for both arms: a constant statistic's interval is itself.
  assert stats.paired_bootstrap_ci(lambda idx: np.full(len(idx), 0.25), 7, 100, 0) == (0.25, 0.25)


def test_resampled_metrics_equal_pope_metrics():
  rng = np.random.default_rng(2)
  labels = ["yes" if v else "no" for v in rng.random(80) < 0.5]
  parsed = ["yes" if v else "no" for v in rng.random(80) < 0.6]
  records = [{"label": t, "parsed": p} for t, p in zip(labels, parsed)]
  arrays = sep.per_item("pope", records)
  indices = rng.integers(0, 80, (5, 80))
  got = sep.resampled_metrics(arrays, indices)
  for row, idx in enumerate(indices):
    expected = pope.metrics([parsed[i] for i in idx], [labels[i] for i in idx])
    assert got["accuracy"][row] == pytest.approx(expected["accuracy"])
    assert got["f1"][row] == pytest.approx(expected["f1"])
  assert (sep.hallucinated_labels("pope", records) == (np.array(parsed) != np.array(labels))).all()
  hb = [{"correct": True}, {"correct": False}]
  assert sep.hallucinated_labels("hallusionbench", hb).tolist() == [False, True]


@torch.no_grad()
def test_recorded_activations_equal_a_forward_pass_of_each_item(tiny_model, synthetic_images):
  loaded = llava.load_llava(str(tiny_model("llava_next")), "float32", "cpu")
  sae = SAE(steer_fixtures.random_params(loaded.d_model, n=48), k=4)
  names = sorted(p.name for p in synthetic_images.iterdir())[:2]
  from PIL import Image
  pictures = [Image.open(synthetic_images / name).convert("RGB") for name in names]
  texts = [llava.prompt_text(loaded.processor, "chat", q) for q in
           ("Is there a cat?", "Is there a dog in the picture at all?")]
  answers, first, image = sep.answer_and_record(loaded, sae, 0, texts, pictures, 3)
  for row, (picture, text) in enumerate(zip(pictures, texts)):  # alone: no padding
    inputs = llava.to_model_inputs(loaded, llava.encode_batch(loaded.processor, [picture], [text]))
    out = loaded.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    length = inputs["input_ids"].shape[1]
    assert loaded.processor.tokenizer.decode(out[0, length:], skip_special_tokens=True) == \
        answers[row]
    forced = loaded.model(**{**inputs, "input_ids": out[:, :length + 1],
                             "attention_mask": torch.ones_like(out[:, :length + 1])},
                          output_hidden_states=True)
    hidden = forced.hidden_states[1][0]  # the output of decoder layer 0

    def dense(rows):
      values, indices = sae.encode(rows)
      return torch.zeros(len(rows), sae.num_latents).scatter(1, indices, values)
    assert torch.allclose(first[row], dense(hidden[length:length + 1])[0], atol=1e-4)
    at_image = inputs["input_ids"][0] == loaded.layout.image_token_id
    assert torch.allclose(image[row], dense(hidden[:length][at_image]).mean(0), atol=1e-4)


def test_command_end_to_end(tiny_model, synthetic_images, tmp_path):
  names = sorted(p.name for p in synthetic_images.iterdir())[:4]
  rows = [{"question_id": i, "image": names[i % 4], "text": f"Is there a {obj} in the image?",
           "label": "yes" if i % 2 else "no"}
          for i, obj in enumerate(["cat", "dog", "car", "cup", "tree", "bus", "cow", "kite"])]
  questions = tmp_path / "pope.jsonl"
  questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
  export = steer_fixtures.write_export(tmp_path / "sae", steer_fixtures.random_params(64))
  out = tmp_path / "out"
  proc = subprocess.run(
      [sys.executable, "-m", "eval.hallucination_latents", f"--model={tiny_model('llava_next')}",
       f"--questions={questions}", f"--image_root={synthetic_images}", f"--sae={export}",
       "--top=2", "--mode=add", "--strengths=0,80", "--batch_size=4", "--max_new_tokens=3",
       "--dtype=float32", "--resamples=200", f"--out={out}"],
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  result = json.loads((out / "results.json").read_text())
  found, held = result["discovery"], result["held_out"]
  assert not set(found) & set(held) and sorted(found + held) == list(range(8))
  assert [found, held] == [a.tolist() for a in sep.split_items(8, 0.5, 0)]

  latents = [json.loads(line) for line in (out / "latents.jsonl").read_text().splitlines()]
  by_first = sorted((row for row in latents if row["first"] is not None),
                    key=lambda row: -row["first"])
  chosen = [row["latent"] for row in result["latents"]]
  assert chosen == summary["latents"] == [row["latent"] for row in by_first[:2]]

  answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
  discovery = [a for a in answers if a["run"] == "discovery"]
  assert [a["question_id"] for a in discovery] == found
  assert [a["hallucinated"] for a in discovery] == [a["parsed"] != a["label"] for a in discovery]
  assert result["discovery_hallucinated"] == sum(a["hallucinated"] for a in discovery)
  correct = {run["label"]: [a["parsed"] == a["label"] for a in answers if a["run"] == run["label"]]
             for run in result["runs"]}
  plain, zero, strong = result["runs"]
  assert [a["question_id"] for a in answers if a["run"] == "plain"] == held
  texts = {run: [a["answer"] for a in answers if a["run"] == run] for run in ("plain", "add 80")}
  assert texts["add 80"] != texts["plain"]  # the chosen latents were steered
  assert zero["change"]["accuracy"]["delta"] == 0.0 and zero["change"]["accuracy"]["ci95"] == [0, 0]
  change = strong["change"]["accuracy"]
  assert change["plain"] == pytest.approx(np.mean(correct["plain"]))
  assert change["delta"] == pytest.approx(np.mean(correct["add 80"]) - np.mean(correct["plain"]))
  assert change["ci95"][0] <= change["delta"] <= change["ci95"][1]
  assert summary["runs"]["add 80"]["accuracy"] == round(change["delta"], 4)
  assert "| add 80 | accuracy |" in (out / "results.md").read_text()


@pytest.mark.parametrize("args,error", [
    (["--task=chair"], "captions have no right answer"),
    (["--latents=3"], "the latents are found here"),
    (["--mode=clamp"], "--mode=clamp needs --values or --strengths"),
])
def test_command_rejects_bad_requests_before_loading(args, error, tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "eval.hallucination_latents", "--model=none", "--questions=q",
       "--sae=s", f"--out={tmp_path}", *args], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1 and error in json.loads(proc.stdout.strip())["error"]
