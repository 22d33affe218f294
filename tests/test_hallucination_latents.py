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
from eval.metrics import latent_separation as sep
from eval.metrics import stats
from eval.tasks import pope
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
  labels = hallucinated.astype(np.float64)
  labels[7] = np.nan  # outside the contrast (e.g. a question whose truth is yes, for false_yes)
  got = sep.latent_aurocs(activations, labels)
  keep = (np.arange(40) != 3) & (np.arange(40) != 7)
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


def test_split_keeps_each_image_on_one_side():
  groups = [f"img{i % 5}" for i in range(23)]
  found, held = sep.split_items(groups, 0.4, seed=3)
  assert sorted([*found, *held]) == list(range(23))
  assert not {groups[i] for i in found} & {groups[i] for i in held}
  assert len({groups[i] for i in found}) == 2  # 40% of the 5 images
  again = sep.split_items(groups, 0.4, seed=3)
  assert (again[0] == found).all()
  assert any(sep.split_items(groups, 0.4, seed=s)[0].tolist() != found.tolist() for s in range(4, 8))


def test_cluster_resamples_draw_whole_images():
  groups = ["a", "a", "a", "b", "c", "c"]
  for idx in sep.cluster_resamples(groups, 50, seed=0):
    drawn = [groups[i] for i in idx]
    assert all(drawn.count(g) % groups.count(g) == 0 for g in set(drawn))  # whole images only
    assert len({g for g in drawn}) <= 3


def test_heldout_auroc_of_a_noise_latent_has_0_5_in_its_interval():
  # Pure noise, 750 items on 150 images, 20% positive, 2000 latents: the discovery maximum is far
  # above 0.5, the chosen latent's held-out AUROC is not, and its interval holds 0.5; the same with
  # the labels permuted.
  rng = np.random.default_rng(0)
  groups = [f"img{i // 5}" for i in range(750)]
  activations = rng.exponential(1.0, (750, 2000)) * (rng.random((750, 2000)) < 0.5)
  labels = (rng.random(750) < 0.2).astype(np.float64)
  found, held = sep.split_items(groups, 0.5, seed=1)
  for trial in range(2):
    if trial:
      labels = rng.permutation(labels)
    discovery = sep.latent_aurocs(activations[found], labels[found])
    best = sep.top_latents(discovery, 1, "hallucinated")[0]
    assert discovery[best] > 0.58
    held_out = sep.auroc_with_ci(activations[held, best], labels[held],
                                 [groups[i] for i in held], 400, seed=2)
    assert held_out["ci95"][0] <= 0.5 <= held_out["ci95"][1]
    assert held_out["auroc"] == pytest.approx(stats.auroc(
        activations[held, best][labels[held] == 1], activations[held, best][labels[held] == 0]))


def test_paired_bootstrap_by_hand():
  # Steering fixes item 1 of 2 and changes nothing else: each resample's change in accuracy is the
  # share of item 1 in it, which is 0 (both picks item 0, chance 1/4), 1/2 or 1 (chance 1/4), so
  # the 2.5th and 97.5th percentiles are 0 and 1.
  truth = np.array([True, False])
  plain = {"correct": np.array([True, False]), "truth": truth}
  steered = {"correct": np.array([True, True]), "truth": truth}
  change = sep.compare(plain, steered, ["a", "b"], resamples=4000, seed=0)["accuracy"]
  assert change == {"plain": 0.5, "steered": 1.0, "delta": 0.5, "ci95": [0.0, 1.0]}
  # Two items of one image move together: resampling images, the change is always the same.
  together = sep.compare(plain, steered, ["a", "a"], resamples=200, seed=0)["accuracy"]
  assert together["ci95"] == [0.5, 0.5]
  # Pairing: the same answers give exactly no change in every resample.
  rng = np.random.default_rng(0)
  same = {"correct": rng.random(50) < 0.5, "truth": rng.random(50) < 0.5}
  assert sep.compare(same, same, [str(i // 3) for i in range(50)], 200, 0)["accuracy"]["ci95"] == \
      [0.0, 0.0]


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
    truth_no = [i for i in idx if labels[i] == "no"]
    assert got["false_yes_rate"][row] == pytest.approx(
        sum(parsed[i] == "yes" for i in truth_no) / len(truth_no))
    truth_yes = [i for i in idx if labels[i] == "yes"]
    assert got["false_no_rate"][row] == pytest.approx(
        sum(parsed[i] != "yes" for i in truth_yes) / len(truth_yes))
  errors = sep.error_labels("pope", records)
  for i, (t_, p_) in enumerate(zip(labels, parsed)):
    assert errors["wrong"][i] == (p_ != t_)
    if t_ == "no":  # false yes: an object that is not there called present
      assert errors["false_yes"][i] == (p_ == "yes") and np.isnan(errors["false_no"][i])
    else:
      assert errors["false_no"][i] == (p_ != "yes") and np.isnan(errors["false_yes"][i])
  hb = [{"correct": True, "gt_answer": "0"}, {"correct": False, "gt_answer": "0"},
        {"correct": False, "gt_answer": "1"}]
  hb_errors = sep.error_labels("hallusionbench", hb)
  assert hb_errors["false_yes"][:2].tolist() == [0, 1] and np.isnan(hb_errors["false_yes"][2])
  assert hb_errors["false_no"][2] == 1 and hb_errors["wrong"].tolist() == [0, 1, 1]


@torch.no_grad()
def test_recorded_activations_equal_a_forward_pass_of_each_item(tiny_model, synthetic_images):
  loaded = llava.load_llava(str(tiny_model("llava_next")), "float32", "cpu")
  sae = SAE(steer_fixtures.random_params(loaded.d_model, n=48), k=4)
  names = sorted(p.name for p in synthetic_images.iterdir())[:2]
  from PIL import Image
  pictures = [Image.open(synthetic_images / name).convert("RGB") for name in names]
  texts = [llava.prompt_text(loaded.processor, "chat", q) for q in
           ("Is there a cat?", "Is there a dog in the picture at all?")]
  answers, places = sep.answer_and_record(loaded, sae, 0, texts, pictures, 3)
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
    assert torch.allclose(places["last_prompt"][row], dense(hidden[length - 1:length])[0], atol=1e-4)
    assert torch.allclose(places["answer"][row], dense(hidden[length:length + 1])[0], atol=1e-4)
    at_image = inputs["input_ids"][0] == loaded.layout.image_token_id
    assert torch.allclose(places["image"][row], dense(hidden[:length][at_image]).mean(0), atol=1e-4)


def test_command_end_to_end(tiny_model, synthetic_images, tmp_path):
  names = sorted(p.name for p in synthetic_images.iterdir())[:4]
  # Every image has a question answered yes and one answered no.
  rows = [{"question_id": i, "image": names[i // 2 % 4], "text": f"Is there a {obj} in the image?",
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
       "--dtype=float32", "--resamples=200", "--error=wrong", f"--out={out}"],
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  result = json.loads((out / "results.json").read_text())
  found, held = result["discovery"], result["held_out"]
  assert sorted(found + held) == list(range(8))
  images = [names[i // 2 % 4] for i in range(8)]
  assert not {images[i] for i in found} & {images[i] for i in held}  # split by image
  groups = [str(synthetic_images / name) for name in images]
  assert [found, held] == [a.tolist() for a in sep.split_items(groups, 0.5, 0)]

  latents = [json.loads(line) for line in (out / "latents.jsonl").read_text().splitlines()]
  ranked = sorted((row for row in latents if row["wrong/last_prompt"] is not None),
                  key=lambda row: -row["wrong/last_prompt"])
  chosen = [row["latent"] for row in result["latents"]]
  assert chosen == summary["latents"] == [row["latent"] for row in ranked[:2]]
  for row, listed in zip(result["latents"], ranked):
    assert row["discovery_auroc"] == listed["wrong/last_prompt"]
    assert row["discovery"]["wrong/answer"] == listed["wrong/answer"]
    held_auroc = row["heldout_by_place"]["last_prompt"]
    assert held_auroc["auroc"] == row["heldout_auroc"]
    if held_auroc["ci95"] is not None:
      assert held_auroc["ci95"][0] <= held_auroc["auroc"] <= held_auroc["ci95"][1]

  answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
  discovery = [a for a in answers if a["run"] == "discovery"]
  assert [a["question_id"] for a in discovery] == found
  assert [a["wrong"] for a in discovery] == [a["parsed"] != a["label"] for a in discovery]
  assert result["discovery_errors"]["wrong"] == sum(a["wrong"] for a in discovery)
  correct = {run["label"]: [a["parsed"] == a["label"] for a in answers if a["run"] == run["label"]]
             for run in result["runs"]}
  labels = [run["label"] for run in result["runs"]]
  assert labels == ["plain", "add 0", "add 80"] + [f"add {s} latent {f}" for f in chosen
                                                   for s in (0, 80)]
  plain, zero, strong = result["runs"][:3]
  assert [a["question_id"] for a in answers if a["run"] == "plain"] == held
  texts = {run: [a["answer"] for a in answers if a["run"] == run] for run in ("plain", "add 80")}
  assert texts["add 80"] != texts["plain"]  # the chosen latents were steered
  assert zero["change"]["accuracy"]["delta"] == 0.0 and zero["change"]["accuracy"]["ci95"] == [0, 0]
  change = strong["change"]["accuracy"]
  assert change["plain"] == pytest.approx(np.mean(correct["plain"]))
  assert change["delta"] == pytest.approx(np.mean(correct["add 80"]) - np.mean(correct["plain"]))
  assert change["ci95"][0] <= change["delta"] <= change["ci95"][1]
  assert summary["runs"]["add 80"]["accuracy"] == round(change["delta"], 4)
  table = (out / "results.md").read_text()
  assert "| add 80 | accuracy |" in table and f"| {chosen[0]} | " in table


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
