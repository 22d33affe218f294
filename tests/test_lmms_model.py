"""The lmms-eval model `llava_sae` (eval/models/lmms_model.py) inside the real lmms-eval, on a small POPE
task built here in lmms-eval's task format (lmms-eval's own POPE config and metrics, our images):
unsteered, it answers as lmms-eval's llava_hf; steered, as interpret.steering on the same prompts;
lmms-eval's POPE metrics of its answers are eval.tasks.pope's.

The tiny LLaVA (harvest/tiny.py) answers "yes" or "no": its output layer is set to score only those
two tokens, +v.h and -v.h, with v the direction along which its last hidden states vary most, so
that both answers occur and a steering edit can change them.
"""

import importlib.metadata
from pathlib import Path

import numpy as np
import pytest

lmms_eval = pytest.importorskip("lmms_eval")
torch = pytest.importorskip("torch")
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

from PIL import Image  # noqa: E402

import steer_fixtures  # noqa: E402

from eval.tasks import pope# noqa: E402
from harvest import llava  # noqa: E402
from interpret import steering  # noqa: E402

QUESTIONS = ["Is there a cat in the image?", "Is there a red circle in the image?",
             "Is there a dog in the image?", "Is there a square in the image?"]
NUM_DOCS = 10
TASK = "tiny_pope"


def chat_text(processor, question: str) -> str:
  """The prompt lmms-eval's chat models build for one image and one question."""
  return processor.apply_chat_template(
      [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
      tokenize=False, add_generation_prompt=True)


@pytest.fixture(scope="module")
def docs(synthetic_images):
  paths = sorted(synthetic_images.glob("*.png"))[:NUM_DOCS]
  return [{"question_id": i, "question": QUESTIONS[i % len(QUESTIONS)],
           "answer": "yes" if i % 3 else "no", "image": Image.open(p).convert("RGB"),
           "category": "tiny"} for i, p in enumerate(paths)]


def post_prompt() -> str:
  """The text lmms-eval's POPE config puts after each question."""
  import yaml
  config = Path(lmms_eval.__file__).parent / "tasks" / "pope" / "pope.yaml"
  text = config.read_text().split("lmms_eval_specific_kwargs:")[1]
  return yaml.safe_load("lmms_eval_specific_kwargs:" + text.split("metadata:")[0])[
      "lmms_eval_specific_kwargs"]["default"]["post_prompt"]


@pytest.fixture(scope="module")
def yes_no_model(tiny_model, docs, tmp_path_factory):
  from transformers import AutoProcessor, LlavaForConditionalGeneration
  source = tiny_model("llava")
  model = LlavaForConditionalGeneration.from_pretrained(source, dtype=torch.float32).eval()
  processor = AutoProcessor.from_pretrained(source)
  processor.tokenizer.add_tokens(["yes"])
  model.resize_token_embeddings(len(processor.tokenizer))
  yes, no = processor.tokenizer.convert_tokens_to_ids(["yes", "no"])
  hidden = []
  with torch.no_grad():
    for doc in docs:
      inputs = processor(images=[doc["image"]], text=chat_text(
          processor, doc["question"] + post_prompt()), return_tensors="pt")
      hidden.append(model(**inputs, output_hidden_states=True).hidden_states[-1][0, -1])
  h = torch.stack(hidden).double()
  mean = h.mean(0)
  v = torch.linalg.svd(h - mean, full_matrices=False).Vh[0]
  v -= (v @ mean) / (mean @ mean) * mean  # the sign of v.h is then the sign of v.(h - mean)
  head = torch.zeros_like(model.lm_head.weight)
  head[yes], head[no] = v.float() * 100, -v.float() * 100
  model.lm_head.weight.data.copy_(head)
  out = tmp_path_factory.mktemp("yes_no_llava")
  model.save_pretrained(out)
  processor.save_pretrained(out)
  return out


@pytest.fixture(scope="module")
def task_dir(docs, tmp_path_factory):
  """lmms-eval's POPE task (its config, prompts and metrics) over our docs, from disk."""
  import datasets
  root = tmp_path_factory.mktemp("lmms_tasks")
  columns = {k: [d[k] for d in docs] for k in docs[0]}
  features = datasets.Features({"question_id": datasets.Value("int64"),
                                "question": datasets.Value("string"),
                                "answer": datasets.Value("string"), "image": datasets.Image(),
                                "category": datasets.Value("string")})
  split = datasets.Dataset.from_dict(columns, features=features)
  datasets.DatasetDict({"test": split}).save_to_disk(root / "data")
  pope_yaml = Path(lmms_eval.__file__).parent / "tasks" / "pope" / "pope.yaml"
  (root / f"{TASK}.yaml").write_text(
      f"include: {pope_yaml}\ntask: {TASK}\ndataset_path: {root / 'data'}\n"
      "dataset_kwargs:\n  load_from_disk: true\n"
      "generation_kwargs:\n  max_new_tokens: 1\n  temperature: 0\n  top_p: 1.0\n"
      "  num_beams: 1\n  do_sample: false\n")
  return root


def evaluate(model_name, model_args, task_dir, batch_size):
  from lmms_eval.evaluator import simple_evaluate
  from lmms_eval.models import MODEL_REGISTRY_V2
  from lmms_eval.tasks import TaskManager
  from eval.lmms_manifest import MANIFEST
  MODEL_REGISTRY_V2.register_manifest(MANIFEST, overwrite=True)  # what the entry point does
  # Only our task indexed (lmms-eval's thousands of configs take seconds); no bootstrap errors.
  tasks = TaskManager(include_path=str(task_dir), include_defaults=False)
  out = simple_evaluate(model=model_name, model_args=model_args, tasks=[TASK],
                        batch_size=batch_size, device="cpu", task_manager=tasks, log_samples=True,
                        bootstrap_iters=0)
  samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
  answers = [s["resps"][0][0] for s in samples]
  answers = [a.text if hasattr(a, "text") else a for a in answers]
  return answers, out["results"][TASK]


@pytest.fixture(scope="module")
def sae_export(tmp_path_factory):
  params = steer_fixtures.random_params(64, n=32, seed=3)
  return steer_fixtures.write_export(tmp_path_factory.mktemp("sae"), params)


def test_entry_point_names_the_manifest():
  pyproject = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
  [(name, value)] = pyproject["project"]["entry-points"]["lmms_eval.models"].items()
  manifest = importlib.metadata.EntryPoint(name, value, "lmms_eval.models").load()
  assert manifest.model_id == "llava_sae" == name
  from lmms_eval.models import MODEL_REGISTRY_V2
  MODEL_REGISTRY_V2.register_manifest(manifest, overwrite=True)
  from eval.models.lmms_model import LlavaSae
  assert MODEL_REGISTRY_V2.get_model_class("llava_sae") is LlavaSae


def test_unsteered_answers_equal_llava_hf_and_steered_ones_interpret_steering(
    yes_no_model, task_dir, sae_export, docs):
  args = f"pretrained={yes_no_model},dtype=float32,device_map=cpu"
  reference, reference_metrics = evaluate("llava_hf", args, task_dir, 1)
  assert set(reference) == {"yes", "no"}  # both answers occur: the comparison means something
  unsteered, _ = evaluate("llava_sae", args, task_dir, 3)  # batches of 3, the last one short
  assert unsteered == reference

  steered, metrics = evaluate(
      "llava_sae", f"{args},sae={sae_export},latents=5;9,mode=add,strength=6", task_dir, 4)
  loaded = llava.load_llava(str(yes_no_model), "float32", "cpu")
  sae, layer = steering.load_sae(loaded, str(sae_export), -1)
  texts = [chat_text(loaded.processor, d["question"] + post_prompt()) for d in docs]
  edits = [steering.Edit(5, 6.0), steering.Edit(9, 6.0)]
  with steering.steering_for(loaded, sae, layer, edits, "add", "all"):
    expected = steering.generate_texts(loaded, [d["image"] for d in docs], texts, 1)
  assert steered == expected
  assert steered != unsteered

  # lmms-eval's POPE metrics of these answers are eval.tasks.pope's (its yes_ratio is that of the labels).
  labels = [d["answer"] for d in docs]
  for answers, lmms in ((reference, reference_metrics), (steered, metrics)):
    ours = pope.metrics([pope.parse_answer(a) for a in answers], labels)
    for name in ("accuracy", "precision", "recall", "f1"):
      key = f"pope_{'f1_score' if name == 'f1' else name}"
      assert lmms[f"{key},none"] == pytest.approx(ours[name]), name
    assert lmms["pope_yes_ratio,none"] == pytest.approx(np.mean([t == "yes" for t in labels]))


def test_bad_model_args_are_named(yes_no_model, sae_export):
  from eval.models.lmms_model import LlavaSae
  common = dict(pretrained=str(yes_no_model), device="cpu", device_map="cpu", dtype="float32")
  with pytest.raises(steering.SteeringError, match="latents need sae"):
    LlavaSae(**common, latents="3")
  with pytest.raises(steering.SteeringError, match="latent 99 does not exist"):
    LlavaSae(**common, sae=str(sae_export), latents="99", mode="ablate")
  with pytest.raises(steering.SteeringError, match="latents=3;x"):
    LlavaSae(**common, sae=str(sae_export), latents="3;x", mode="ablate")
