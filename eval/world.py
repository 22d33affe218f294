"""`python -m eval.world --out=DIR`: a miniature world with ground truth, trained here on CPU.

The paper's models cannot be downloaded here, and random tiny models find, name and steer nothing.
This world trains real transformers and open_clip classes on the world scenes of `harvest.images`
(4 shapes in distinct named colours on a grey texture, each recorded in concepts.jsonl), so that
the pipeline's answers can be checked against what was drawn:
  DIR/subject/   a small LLaVA-NeXT (64 px images, 8 px patches: an 8x8 base grid) trained to
                 caption a scene ("red ellipse blue triangle ... on stripes", shapes left to right),
                 so its residual stream carries the colours, shapes and textures where they are
  DIR/clip/      a small open_clip CLIP trained contrastively on the scenes and their captions (or
                 a few of their concept words)
  DIR/explainer/ a small LLaVA-OneVision trained on the paper's explanation prompt (five images,
                 regions outside a concept darkened, as interpret.explain shows top images) to
                 answer with the concept's name
  DIR/world.json the settings, code version, losses and held-out checks of each model
A word-level tokenizer (the `tokenizers` library's WordLevel, lower-cased) covers the captions,
the chat template and the explanation prompt: every word outside it is <unk>.

Weights come from fixed seeds. A folder whose world.json holds the same settings and the same
code version (a hash of this module, harvest/tiny.py and harvest/images.py) is kept, so a rerun
costs nothing; anything else is retrained. The random models of `harvest.tiny` stay for the fast
tests.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

from eval.models import clip as clip_lib
from eval.metrics import iou as iou_lib
from eval import tiny_clip
from harvest import images as images_lib
from harvest import llava, tiny
from interpret import explainers, prompts, visual
from sae_jax.files import atomic_write_json

WORLD_FILE = "world.json"
SUBJECT_DIR = "subject"
CLIP_DIR = "clip"
EXPLAINER_DIR = "explainer"
# What interpret.explain shows the world's explainer: --num_images, --image_size, --answer_prefix.
EXPLAIN_IMAGES = 5
EXPLAIN_IMAGE_SIZE = images_lib.WORLD_SIZE
ANSWER_PREFIX = "[EXPLANATION]:"
CAPTION_PROMPT = "Describe the image."
# 64 px images cut into 8 px patches: the 8x8 base grid the issue asks for; one anyres tile.
SIZES = tiny.Sizes(image_size=images_lib.WORLD_SIZE, patch_size=8, hidden=64, num_layers=2,
                   vision_hidden=64, vision_layers=2,
                   grid_pinpoints=((images_lib.WORLD_SIZE, images_lib.WORLD_SIZE),))
# The explainer sees five images per prompt: 16 px patches (a 4x4 grid each) keep it fast; it
# still sees which 8 px patches of the subject's grid are highlighted, at half the resolution.
EXPLAINER_SIZES = dataclasses.replace(SIZES, patch_size=16)
HARVEST_LAYER = 0  # the decoder block whose output the quickstart harvests and steers
# A small open_clip CLIP on 32 px images; texts are short, so 16 tokens of context suffice.
CLIP_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": tiny_clip.IMAGE_SIZE, "layers": 2, "width": 64, "head_width": 32,
                   "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@dataclasses.dataclass(frozen=True)
class Settings:
  """What determines the world (with the code version): its cache key."""
  train_images: int = 1000
  held_out: int = 64
  seed: int = 0
  subject_steps: int = 800
  clip_steps: int = 300
  clip_batch_size: int = 64
  explainer_steps: int = 1600
  explainer_batch_size: int = 8
  batch_size: int = 16
  # Each model's AdamW lr. CLIP's and the explainer's are the best of sweeps over five worlds
  # (docs/benchmarks.md): at the subject's 3e-3, one CLIP in five stayed at chance and the
  # explainer named fewer concepts.
  subject_lr: float = 3e-3
  clip_lr: float = 5e-4
  explainer_lr: float = 1e-3


def caption(record: dict) -> str:
  """The words a world scene is described by: visible shapes left to right, then the texture."""
  owner = images_lib.shape_owner(record)
  seen = []
  for i, spec in enumerate(record["shapes"], 1):
    if (owner == i).mean() >= 0.02:  # a sliver the model cannot see is not named
      seen.append(((spec["box"][0] + spec["box"][2]) / 2, f"{spec['colour']} {spec['shape']}"))
  words = [name for _, name in sorted(seen)]
  return " ".join(words + ["on", record["texture"]])


def vocabulary() -> list[str]:
  """Every word of the world's texts: captions, the chat template, the explanation prompt."""
  words = set(images_lib.WORLD_COLOURS) | set(images_lib.WORLD_SHAPES) | set(images_lib.TEXTURES)
  template = prompts.load_template()
  corpus = " ".join([CAPTION_PROMPT, "user assistant on", template.system, template.user,
                     "[EXPLANATION]: Unable to produce descriptions"])
  words |= {w for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(corpus.lower())}
  return tiny.SPECIAL_TOKENS + sorted(words)


def build_tokenizer() -> transformers.PreTrainedTokenizerFast:
  """A lower-casing word-level tokenizer over `vocabulary()` that prepends BOS like Llama's."""
  vocab = {word: i for i, word in enumerate(vocabulary())}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.normalizer = normalizers.Lowercase()
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.add_special_tokens(tiny.SPECIAL_TOKENS)
  tok.post_processor = processors.TemplateProcessing(
      single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])])
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
      pad_token="<pad>", extra_special_tokens={"image_token": "<image>"},
      model_max_length=4096)


def code_version() -> str:
  """sha256 of the modules that define the world: a change to any of them retrains it."""
  digest = hashlib.sha256()
  for module in (__file__, tiny.__file__, images_lib.__file__):
    digest.update(Path(module).read_bytes())
  return digest.hexdigest()[:16]


def scenes(first: int, num: int) -> tuple[list, list[dict]]:
  """(PIL images, scene records) of world scenes first .. first + num - 1."""
  drawn = [images_lib.scene(seed, "world") for seed in range(first, first + num)]
  return [images_lib.render(*d) for d in drawn], [d[1] for d in drawn]


def _caption_batch(processor, pictures: list, captions: list[str]) -> dict:
  """Chat-prompted inputs with each caption as the answer; labels only on the answer tokens."""
  prompt = llava.prompt_text(processor, "chat", CAPTION_PROMPT)
  encoded = llava.encode_batch(processor, pictures, [f"{prompt} {c} </s>" for c in captions])
  # Every world image has the same size, so the prompt has the same length in every row.
  prompt_len = llava.encode_batch(processor, pictures[:1], [prompt])["input_ids"].shape[1]
  labels = encoded["input_ids"].clone()
  labels[:, :prompt_len] = -100
  labels[encoded["attention_mask"] == 0] = -100
  encoded["labels"] = labels
  return encoded


def _train(model, batches, steps: int, lr: float, seed: int, log) -> list[float]:
  """AdamW with a linear warmup and cosine decay; returns the loss every 50 steps."""
  torch.manual_seed(seed)
  optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
  schedule = torch.optim.lr_scheduler.LambdaLR(
      optimizer, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + np.cos(np.pi * s / steps)))
  model.train()
  losses, recent = [], []
  for step in range(steps):
    loss = model(**batches(step)).loss
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    schedule.step()
    recent.append(loss.item())
    if (step + 1) % 50 == 0 or step + 1 == steps:
      losses.append(round(float(np.mean(recent)), 4))
      log(f"step {step + 1}/{steps} loss {losses[-1]}")
      recent = []
  model.eval()
  return losses


def _sampler(data: dict, batch_size: int, seed: int):
  rng = np.random.default_rng(seed)
  num = data["input_ids"].shape[0]

  def batch(step: int) -> dict:
    rows = torch.as_tensor(rng.choice(num, batch_size, replace=False))
    return {k: v[rows] for k, v in data.items()}
  return batch


def generate_captions(model, processor, pictures: list, max_new_tokens: int = 12) -> list[str]:
  """Greedy captions of the trained subject (the same prompt it was trained on)."""
  prompt = llava.prompt_text(processor, "chat", CAPTION_PROMPT)
  encoded = llava.encode_batch(processor, pictures, [prompt] * len(pictures), padding_side="left")
  with torch.inference_mode():
    out = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False)
  return [t.strip() for t in processor.batch_decode(out[:, encoded["input_ids"].shape[1]:],
                                                    skip_special_tokens=True)]


def caption_accuracy(predicted: list[str], records: list[dict]) -> dict:
  """Share of held-out scenes whose caption is exact, and per kind of word (colour, shape,
  texture) the share of the scene's words that the caption contains."""
  exact, found = 0, {"colour": [], "shape": [], "texture": []}
  for text, record in zip(predicted, records):
    truth = caption(record)
    exact += text == truth
    words = set(text.split())
    for spec in record["shapes"]:
      if f"{spec['colour']} {spec['shape']}" in truth:
        found["colour"].append(spec["colour"] in words)
        found["shape"].append(spec["shape"] in words)
    found["texture"].append(record["texture"] in words)
  return {"exact": exact / len(records),
          **{kind: float(np.mean(hits)) for kind, hits in found.items()}}


def train_subject(settings: Settings, out: Path, log=print) -> dict:
  """Trains and saves the captioning LLaVA-NeXT; returns its record for world.json."""
  started = time.perf_counter()
  model, processor = tiny.build("llava_next", settings.seed, SIZES, build_tokenizer())
  pictures, records = scenes(settings.seed, settings.train_images)
  data = _caption_batch(processor, pictures, [caption(r) for r in records])
  losses = _train(model, _sampler(data, settings.batch_size, settings.seed),
                  settings.subject_steps, settings.subject_lr, settings.seed, log)
  model.save_pretrained(out)
  processor.save_pretrained(out)
  held_pictures, held_records = scenes(held_out_seed(settings), settings.held_out)
  accuracy = caption_accuracy(generate_captions(model, processor, held_pictures), held_records)
  log(f"subject: held-out caption accuracy {accuracy}")
  return {"losses": losses, "held_out_accuracy": accuracy,
          "seconds": round(time.perf_counter() - started, 1)}


def concept_words(record: dict) -> list[str]:
  """The concept names of a scene that its caption says (colours, shapes, the texture)."""
  words = caption(record).split()
  return sorted(set(words) - {"on"})


def clip_text(record: dict, rng: np.random.Generator) -> str:
  """A CLIP training text of a scene: its caption, or a few of its concept names, so that a
  single word (the kind an explanation is) also lands near the scenes that show it."""
  if rng.random() < 0.5:
    return caption(record)
  words = concept_words(record)
  return " ".join(rng.choice(words, int(rng.integers(1, min(3, len(words)) + 1)), replace=False))


def train_clip(settings: Settings, out: Path, log=print) -> dict:
  """Trains an open_clip CLIP contrastively on world scenes and their texts; saves it to `out`
  (an open_clip local-dir folder, eval.tiny_clip's layout)."""
  import open_clip
  started = time.perf_counter()
  torch.manual_seed(settings.seed)
  spec = tiny_clip.save(out, settings.seed, CLIP_CFG)  # random weights, to load the transforms
  clip = clip_lib.load(spec, None)
  model = clip.model
  pictures, records = scenes(settings.seed, settings.train_images)
  pixels = torch.stack([clip.preprocess(p) for p in pictures])
  rng = np.random.default_rng(settings.seed)
  optimizer = torch.optim.AdamW(model.parameters(), lr=settings.clip_lr, weight_decay=0.01)
  loss_fn = open_clip.ClipLoss()
  model.train()
  losses, recent = [], []
  for step in range(settings.clip_steps):
    rows = rng.choice(len(records), settings.clip_batch_size, replace=False)
    texts = clip.tokenizer([clip_text(records[r], rng) for r in rows])
    image_features = model.encode_image(pixels[torch.as_tensor(rows)], normalize=True)
    text_features = model.encode_text(texts, normalize=True)
    loss = loss_fn(image_features, text_features, model.logit_scale.exp())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    recent.append(loss.item())
    if (step + 1) % 50 == 0 or step + 1 == settings.clip_steps:
      losses.append(round(float(np.mean(recent)), 4))
      log(f"clip step {step + 1}/{settings.clip_steps} loss {losses[-1]}")
      recent = []
  model.eval()
  tiny_clip.write(out, model, CLIP_CFG)
  return {"losses": losses, "held_out": clip_retrieval(clip, settings),
          "seconds": round(time.perf_counter() - started, 1)}


def clip_retrieval(clip, settings: Settings) -> dict:
  """On held-out scenes: how often a colour name scores higher on a scene showing it than on
  one that does not (an AUROC over scene pairs, averaged over colours)."""
  pictures, records = scenes(held_out_seed(settings), settings.held_out)
  with torch.inference_mode():
    images = clip.model.encode_image(torch.stack([clip.preprocess(p) for p in pictures]),
                                     normalize=True)
    texts = clip.model.encode_text(clip.tokenizer(list(images_lib.WORLD_COLOURS)), normalize=True)
  scores = (images @ texts.T).numpy()
  aurocs = []
  for c, colour in enumerate(images_lib.WORLD_COLOURS):
    shown = np.array([colour in concept_words(r) for r in records])
    if shown.any() and (~shown).any():
      pos, neg = scores[shown, c], scores[~shown, c]
      aurocs.append(float((pos[:, None] > neg[None, :]).mean()))
  return {"colour_auroc": round(float(np.mean(aurocs)), 4)}


def concept_name(concept: str) -> str:
  """The word an explanation names a concept by: "colour:red" -> "red"."""
  return concept.split(":", 1)[1]


class GridConcepts:
  """Each scene's concept masks at the subject's patch grid, and which scenes show each concept."""

  def __init__(self, records: list[dict]):
    grid = (SIZES.image_size // SIZES.patch_size,) * 2
    self.grid = grid
    self.masks = [{name: iou_lib.mask_to_grid(mask, grid)
                   for name, mask in images_lib.concept_masks(r).items()} for r in records]
    names = sorted({n for m in self.masks for n, grid_mask in m.items() if grid_mask.any()})
    self.showing = {n: [i for i, m in enumerate(self.masks) if n in m and m[n].any()]
                    for n in names}


def explanation_prompt(pictures: list, maps: list[np.ndarray], grid: tuple[int, int],
                       template: prompts.Template) -> prompts.Prompt:
  """The prompt interpret.explain builds from top images and their patch maps (the world's
  --num_images, --image_size and --answer_prefix)."""
  masked = [visual.dim_mask(p, m.astype(np.float32), grid, EXPLAIN_IMAGE_SIZE)
            for p, m in zip(pictures, maps)]
  rendered = template.render([visual.png_bytes(m) for m in masked])
  return dataclasses.replace(rendered, answer_prefix=ANSWER_PREFIX)


def _latent_like(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """A concept's grid mask as an SAE latent's map might be: some patches missed, a few extra."""
  kept = mask & (rng.random(mask.shape) >= rng.uniform(0, 0.3))
  extra = ~mask & (rng.random(mask.shape) < rng.uniform(0, 0.05))
  out = kept | extra
  return out if out.any() else mask


def train_explainer(settings: Settings, out: Path, log=print) -> dict:
  """Trains a LLaVA-OneVision to answer the explanation prompt with the concept that the
  highlighted regions of its images share; saves it to `out`. Every other step is a captioning
  batch: it teaches the vision tower the world's words far faster than the one answer word of an
  explanation does."""
  started = time.perf_counter()
  model, processor = tiny.build("llava_onevision", settings.seed, EXPLAINER_SIZES,
                                build_tokenizer())
  template = prompts.load_template()
  pictures, records = scenes(settings.seed, settings.train_images)
  concepts = GridConcepts(records)
  names = sorted(concepts.showing)
  rng = np.random.default_rng(settings.seed + 1)
  captions = _sampler(_caption_batch(processor, pictures, [caption(r) for r in records]),
                      2 * settings.explainer_batch_size, settings.seed)

  def batch(step: int) -> dict:
    if step % 2:
      return captions(step)
    texts, images, answers = [], [], []
    for _ in range(settings.explainer_batch_size):
      name = names[rng.integers(len(names))]
      rows = rng.choice(concepts.showing[name], EXPLAIN_IMAGES, replace=False)
      prompt = explanation_prompt([pictures[r] for r in rows],
                                  [_latent_like(concepts.masks[r][name], rng) for r in rows],
                                  concepts.grid, template)
      text, shown = explainers.hf_chat(processor, prompt)
      texts.append(text)
      answers.append(f"{text} {concept_name(name)} </s>")
      images.extend(shown)
    encoded = processor(text=answers, images=images, return_tensors="pt", padding=True,
                        padding_side="right")
    prompt_lens = [len(processor.tokenizer(t.replace("<image>", ""))["input_ids"]) for t in texts]
    answer_lens = [len(processor.tokenizer(a.replace("<image>", ""))["input_ids"]) - n
                   for a, n in zip(answers, prompt_lens)]
    labels = torch.full_like(encoded["input_ids"], -100)
    lengths = encoded["attention_mask"].sum(1)
    for row, (length, answer) in enumerate(zip(lengths.tolist(), answer_lens)):
      labels[row, length - answer:length] = encoded["input_ids"][row, length - answer:length]
    return {**{k: v for k, v in encoded.items() if k != "token_type_ids"}, "labels": labels}

  losses = _train(model, batch, settings.explainer_steps, settings.explainer_lr, settings.seed,
                  log)
  model.save_pretrained(out)
  processor.save_pretrained(out)
  return {"losses": losses, "held_out": explainer_accuracy(model, processor, settings),
          "seconds": round(time.perf_counter() - started, 1)}


def explainer_accuracy(model, processor, settings: Settings, per_concept: int = 2) -> dict:
  """Share of held-out prompts (true concept masks, `per_concept` per concept) answered with
  the concept's name."""
  template = prompts.load_template()
  pictures, records = scenes(held_out_seed(settings), settings.held_out)
  concepts = GridConcepts(records)
  rng = np.random.default_rng(settings.seed + 2)
  hits = []
  for name, rows in sorted(concepts.showing.items()):
    for _ in range(per_concept if len(rows) >= EXPLAIN_IMAGES else 0):
      chosen = rng.choice(rows, EXPLAIN_IMAGES, replace=False)
      prompt = explanation_prompt([pictures[r] for r in chosen],
                                  [concepts.masks[r][name] for r in chosen], concepts.grid,
                                  template)
      text, shown = explainers.hf_chat(processor, prompt)
      inputs = processor(text=text, images=shown, return_tensors="pt")
      with torch.inference_mode():
        answer = model.generate(**inputs, max_new_tokens=4, do_sample=False)
      said = processor.batch_decode(answer[:, inputs["input_ids"].shape[1]:],
                                    skip_special_tokens=True)[0]
      hits.append(concept_name(name) in said.split())
  return {"names_concept": round(float(np.mean(hits)), 4), "prompts": len(hits)}


def held_out_seed(settings: Settings) -> int:
  """First seed of scenes never trained on (the quickstart's images start here too)."""
  return settings.seed + settings.train_images


PARTS = {SUBJECT_DIR: train_subject, CLIP_DIR: train_clip, EXPLAINER_DIR: train_explainer}
PART_FILE = "trained.json"  # in each model's folder: its settings, code version and record


def build_part(out: Path, name: str, settings: Settings, wanted: dict, log=print) -> dict:
  """Trains one model into out/name unless its trained.json says the same settings and code
  did; returns its record. The parts are independent: separate processes may build them."""
  stamp = out / name / PART_FILE
  if stamp.exists():
    record = json.loads(stamp.read_text())
    if {k: record.get(k) for k in wanted} == wanted:
      return record["record"]
  record = PARTS[name](settings, out / name, log)
  atomic_write_json(stamp, {**wanted, "record": record})  # written last: marks a finished part
  return record


def build(out: str | Path, settings: Settings = Settings(), parts=tuple(PARTS),
          log=print) -> dict | None:
  """Builds the world in `out` unless the same settings and code already did; returns world.json
  (None when `parts` leaves some model unbuilt)."""
  out = Path(out)
  stamp = out / WORLD_FILE
  wanted = {"settings": dataclasses.asdict(settings), "code_version": code_version()}
  if stamp.exists():
    record = json.loads(stamp.read_text())
    if {k: record.get(k) for k in wanted} == wanted:
      return record
  out.mkdir(parents=True, exist_ok=True)
  records = {name: build_part(out, name, settings, wanted, log) for name in parts}
  if set(records) != set(PARTS):
    return None
  record = {**wanted, "held_out_seed": held_out_seed(settings), **records}
  atomic_write_json(stamp, record)  # written last: marks a complete world
  return record


if __name__ == "__main__":
  from absl import flags

  from sae_jax import cli

  _OUT = flags.DEFINE_string("out", None, "Folder of the world (see the module doc).",
                             required=True)
  _TRAIN_IMAGES = flags.DEFINE_integer("train_images", Settings.train_images,
                                       "World scenes trained on.", lower_bound=64)
  _SUBJECT_STEPS = flags.DEFINE_integer("subject_steps", Settings.subject_steps,
                                        "Training steps of the subject LLaVA.", lower_bound=1)
  _SEED = flags.DEFINE_integer("seed", 0, "Seed of the scenes and the weights.")
  _TORCH_THREADS = flags.DEFINE_integer("torch_threads", 2, "torch intra-op threads.",
                                        lower_bound=1)
  _PARTS = flags.DEFINE_multi_enum("parts", list(PARTS), list(PARTS), "Models to build (default "
                                   "all; separate processes may build separate parts, then a run "
                                   "with all of them writes world.json).")

  def main():
    torch.set_num_threads(_TORCH_THREADS.value)
    settings = Settings(train_images=_TRAIN_IMAGES.value, subject_steps=_SUBJECT_STEPS.value,
                        seed=_SEED.value)
    record = build(_OUT.value, settings, tuple(_PARTS.value))
    if record is None:
      print(json.dumps({"ok": True, "out": _OUT.value, "built": _PARTS.value}))
      return
    print(json.dumps({"ok": True, "out": _OUT.value, "held_out_seed": record["held_out_seed"],
                      **{name: {k: v for k, v in record[name].items() if k != "losses"}
                         for name in PARTS}}))

  cli.run(main)
