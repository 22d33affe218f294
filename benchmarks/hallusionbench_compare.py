"""Our HallusionBench metrics against the official `utils.py`, on the real question file.

Not part of the project: it imports the official scorer from a clone of tianyi-lab/HallusionBench
(its `openai` and `prettytable` imports are stubbed; it needs numpy and tqdm):

  git clone https://github.com/tianyi-lab/HallusionBench /tmp/HallusionBench
  python benchmarks/hallusionbench_compare.py --official=/tmp/HallusionBench --trials=20

Each trial gives every question of HallusionBench.json a random correctness code ("1" correct,
"0" incorrect, "2" unclear, as the official GPT judge writes them), runs the official
assign_correctness, get_eval_all, get_eval_fig, get_eval_pair_all/_easy/_hard, and ours
(eval/tasks/hallusionbench.py), and checks that aAcc, fAcc, qAcc, easy and hard agree to 1e-9. Prints
one JSON line per trial and a summary.
"""

import argparse
import copy
import importlib.util
import json
import random
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eval.tasks import hallusionbench# noqa: E402

ENTRY = "gpt4v_output_gpt_check"  # the official scripts' correctness field


def load_official(folder: Path):
  for name in ("openai", "prettytable"):  # imported at the top, unused by the metrics
    sys.modules.setdefault(name, types.ModuleType(name))
  sys.modules["prettytable"].PrettyTable = object
  spec = importlib.util.spec_from_file_location("hb_official_utils", folder / "utils.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def official_metrics(utils, rows: list[dict]) -> dict:
  """What the official evaluation.py prints, from rows that carry the correctness codes."""
  data = utils.assign_correctness(copy.deepcopy(rows), correctness_entry=ENTRY)
  for r in data:
    r.setdefault("same", "0")  # the pair analysis reads it; it does not change the counts
  share = lambda stat: 100 * stat["correct"] / stat["total"]
  return {"aAcc": share(utils.get_eval_all(data, ENTRY)), "fAcc": share(utils.get_eval_fig(data)),
          "qAcc": share(utils.get_eval_pair_all(data, ENTRY)),
          "easy": share(utils.get_eval_pair_easy(data)),
          "hard": share(utils.get_eval_pair_hard(data))}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--official", required=True, type=Path, help="clone of the official repo")
  parser.add_argument("--trials", type=int, default=20)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  utils = load_official(args.official)
  questions = hallusionbench.read_questions(args.official / "HallusionBench.json")
  rng = random.Random(args.seed)
  worst = 0.0
  for trial in range(args.trials):
    p_correct = rng.uniform(0.2, 0.9)  # from mostly wrong to mostly right
    codes = [rng.choices(["1", "0", "2"], [p_correct, (1 - p_correct) * 0.7,
                                            (1 - p_correct) * 0.3])[0] for _ in questions]
    official = official_metrics(utils, [{**q.row, ENTRY: c} for q, c in zip(questions, codes)])
    ours = hallusionbench.scores(questions, codes)
    gap = max(abs(official[k] - ours[k]) for k in official)
    worst = max(worst, gap)
    print(json.dumps({"trial": trial, "official": official,
                      "ours": {k: ours[k] for k in official}, "max_abs_diff": gap}))
  print(json.dumps({"trials": args.trials, "questions": len(questions), "max_abs_diff": worst,
                    "equal": worst < 1e-9}))
  sys.exit(0 if worst < 1e-9 else 1)


if __name__ == "__main__":
  main()
