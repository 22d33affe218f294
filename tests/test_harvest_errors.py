"""Each kind of bad input stops (or is skipped) with an error that names its flag, file or image."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import transformers

from harvest import hooks, images, llava
from harvest.run import HarvestConfig, HarvestError, harvest
from harvest.shards import ActivationError
from sae_jax.store import Store, StoreError


@pytest.fixture
def config(tiny_model, synthetic_images, tmp_path):
  return HarvestConfig(model=str(tiny_model("llava_next")), layers=(1,),
                       images=str(synthetic_images), out=str(tmp_path / "store"), batch_size=2,
                       shard_images=4, max_images=8)


def _jsonl_with_bad_images(synthetic_images, tmp_path):
  garbage = tmp_path / "garbage.png"
  garbage.write_bytes(b"this is not a png")
  good = sorted(synthetic_images.glob("*.png"))[:4]
  entries = [good[0], tmp_path / "missing.png", good[1], garbage, good[2], good[3]]
  path = tmp_path / "inputs.jsonl"
  path.write_text("".join(json.dumps({"image": str(p)}) + "\n" for p in entries))
  return path


def test_bad_images_are_skipped_and_listed(config, synthetic_images, tmp_path):
  jsonl = _jsonl_with_bad_images(synthetic_images, tmp_path)
  summary = harvest(dataclasses.replace(config, images=str(jsonl)), progress=False)
  assert summary["images"] == 4 and summary["bad_images"] == 2
  store = Store(tmp_path / "store" / "layer_1", verify=True)
  bad = store.manifest["bad_images"]
  assert [b["input"] for b in bad] == [1, 3]
  assert bad[0]["source"].endswith("missing.png") and "No such file" in bad[0]["error"]
  assert bad[1]["source"].endswith("garbage.png") and "cannot identify" in bad[1]["error"]
  assert [r["id"] for r in store.images()] == [0, 1, 2, 3]  # ids count good images only
  assert sorted(set(store.meta()["image_id"])) == [0, 1, 2, 3]


def test_bad_image_fails_when_asked(config, synthetic_images, tmp_path):
  jsonl = _jsonl_with_bad_images(synthetic_images, tmp_path)
  with pytest.raises(HarvestError, match=r"input 1 \(.*missing.png\).*--on_bad_image"):
    harvest(dataclasses.replace(config, images=str(jsonl), on_bad_image="fail"), progress=False)


def test_nan_activations_name_the_image(config, monkeypatch):
  load_llava = llava.load_llava

  def load_with_nan(*args, **kwargs):
    loaded = load_llava(*args, **kwargs)
    _, blocks = hooks.find_decoder_layers(loaded.model)

    def poison_second_image(module, args, output):
      output[1, 5] = float("nan")
    blocks[0].register_forward_hook(poison_second_image)
    return loaded

  monkeypatch.setattr(llava, "load_llava", load_with_nan)
  with pytest.raises(ActivationError, match=r"layer 1 for image id 1 \(.*synthetic_00001.png\)"):
    harvest(config, progress=False)
  store = Store(config.out + "/layer_1", allow_incomplete=True)
  assert store.shards == []  # nothing of the poisoned shard was committed


def test_unknown_layer_names_the_layer_count(config):
  with pytest.raises(hooks.HookError, match=r"layer 7 does not exist; .* has 2 decoder layers"):
    harvest(dataclasses.replace(config, layers=(1, 7)), progress=False)


def test_non_llava_model_is_refused(config, tmp_path):
  transformers.LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, vocab_size=32).save_pretrained(tmp_path / "llama")
  with pytest.raises(llava.ModelError, match=r"is a 'llama' model .*not LLaVA-like"):
    harvest(dataclasses.replace(config, model=str(tmp_path / "llama")), progress=False)


def test_store_from_other_flags_is_refused(config):
  harvest(config, progress=False)
  with pytest.raises(StoreError, match=r"other settings.*tokens"):
    harvest(dataclasses.replace(config, tokens="all"), progress=False)


def test_shards_must_end_on_batch_boundaries(config):
  with pytest.raises(HarvestError, match=r"--shard_images=5 is not a multiple of --batch_size=2"):
    harvest(dataclasses.replace(config, shard_images=5), progress=False)


def test_missing_input_folder_is_named(config, tmp_path):
  with pytest.raises(images.InputError, match=r"--images=.*nowhere does not exist"):
    harvest(dataclasses.replace(config, images=str(tmp_path / "nowhere")), progress=False)


def test_corrupted_shard_is_named_by_the_store_cli(config):
  harvest(config, progress=False)
  acts = Store(config.out + "/layer_1").path / "shards" / "00001.acts.npy"
  data = bytearray(acts.read_bytes())
  data[-3] ^= 0xFF
  acts.write_bytes(bytes(data))
  result = subprocess.run(
      [sys.executable, "-m", "sae_jax.store", f"--store={config.out}/layer_1"],
      capture_output=True, text=True, timeout=120)
  assert result.returncode == 1
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert not report["ok"] and "shard 1" in report["error"]
  assert "shards/00001.acts.npy is corrupted" in report["error"]


def test_dataset_input(config, synthetic_images, tmp_path):
  datasets = pytest.importorskip("datasets")
  paths = sorted(str(p) for p in synthetic_images.glob("*.png"))[:5]
  features = datasets.Features({"picture": datasets.Image(), "prompt": datasets.Value("string")})
  dataset = datasets.Dataset.from_dict(
      {"picture": paths, "prompt": ["one", "two", "three", "four", "five"]}, features=features)
  dataset.save_to_disk(str(tmp_path / "dataset"))
  summary = harvest(dataclasses.replace(
      config, images=str(tmp_path / "dataset"), image_column="picture", prompt_mode="chat"),
      progress=False)
  assert summary["images"] == 5
  table = Store(config.out + "/layer_1").images()
  assert table[2]["source"].endswith("dataset[2]") and "three" in table[2]["prompt"]
  meta = Store(config.out + "/layer_1").meta()
  assert np.all(meta["kind"] == 0) and len(meta) == 5 * 16
