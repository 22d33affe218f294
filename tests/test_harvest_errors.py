"""Each kind of bad input stops (or is skipped) with an error that names its flag, file or image."""

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import transformers
from PIL import Image

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


def test_all_bad_inputs_exit_nonzero_and_leave_the_store_incomplete(config, tmp_path):
  folder = tmp_path / "unreadable"
  folder.mkdir()
  for name in ("a.png", "b.jpg", "c.png"):
    (folder / name).write_bytes(b"not an image")
  result = subprocess.run(
      [sys.executable, "-m", "harvest", f"--model={config.model}", "--layers=1",
       f"--images={folder}", f"--out={config.out}", "--batch_size=2", "--shard_images=2"],
      capture_output=True, text=True, timeout=300)
  assert result.returncode == 1, result.stderr[-2000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert not report["ok"]
  assert re.fullmatch(r"none of the 3 inputs of --images=.*unreadable could be read; input 0 "
                      r"\(.*a\.png\): UnidentifiedImageError: .*; the stores in --out=.* are "
                      r"left incomplete", report["error"]), report["error"]
  with pytest.raises(StoreError, match="is incomplete"):
    Store(config.out + "/layer_1")
  store = Store(config.out + "/layer_1", allow_incomplete=True, verify=True)
  bad = [Path(b["source"]).name for b in store.manifest["bad_images"]]
  assert bad == ["a.png", "b.jpg", "c.png"]
  assert store.rows == 0


def test_images_over_the_pixel_limit_are_skipped_and_named(config, tmp_path):
  # 2,000 pixels allowed: PIL itself warns on b (3,000) and raises its own error on c (5,000).
  sizes = {"a.png": (40, 30), "b.png": (60, 50), "c.png": (100, 50), "d.png": (30, 30)}
  rng = np.random.default_rng(0)
  (tmp_path / "all").mkdir(), (tmp_path / "good").mkdir()
  for name, (w, h) in sizes.items():
    image = Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8))
    for folder in ("all", "good") if name in ("a.png", "d.png") else ("all",):
      image.save(tmp_path / folder / name)
  limited = dataclasses.replace(config, images=str(tmp_path / "all"), max_image_pixels=2000,
                                out=str(tmp_path / "limited"))
  summary = harvest(limited, progress=False)
  assert Image.MAX_IMAGE_PIXELS == images.DEFAULT_MAX_PIXELS  # restored after the harvest
  assert summary["images"] == 2 and summary["bad_images"] == 2
  store = Store(tmp_path / "limited" / "layer_1", verify=True)
  bad = {Path(b["source"]).name: b["error"] for b in store.manifest["bad_images"]}
  limit = (r", over the pixel limit of 2000 "
           r"\(PIL.Image.MAX_IMAGE_PIXELS; the harvest's --max_image_pixels\)")
  assert re.fullmatch(r"60x50 = 3000 pixels" + limit, bad["b.png"]), bad
  assert re.fullmatch(r"5000 pixels" + limit, bad["c.png"]), bad
  # The good images are stored exactly as by a harvest of them alone.
  harvest(dataclasses.replace(config, images=str(tmp_path / "good"), out=str(tmp_path / "ref")),
          progress=False)
  reference = Store(tmp_path / "ref" / "layer_1")
  assert [Path(r["source"]).name for r in store.images()] == ["a.png", "d.png"]
  np.testing.assert_array_equal(store.meta(), reference.meta())
  np.testing.assert_array_equal(np.asarray(store.shard_acts(0)),
                                np.asarray(reference.shard_acts(0)))


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
