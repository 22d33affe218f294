"""Command-line flags of `python -m harvest` (every one also accepted from `--flagfile`)."""

import dataclasses
import os

import torch
from absl import flags

from harvest import llava, workers
from harvest.images import DEFAULT_MAX_PIXELS
from harvest.run import HarvestConfig, HarvestError
from harvest.tokens import TOKEN_MODES

# --model --dtype --device --prompt_mode, as every command that runs a LLaVA model has them; the
# harvest runs the model in float32 and gives it the paper's bare prompt unless told otherwise.
llava.define_flags(dtype="float32", prompt_mode="bare")
flags.adopt_module_key_flags(llava)
LAYERS = flags.DEFINE_list(
    "layers", None, "Decoder layer indices to record, e.g. 24 or 24,30. The stored vector is the "
    "output of decoder block L, i.e. hidden_states[L + 1]. All layers come from one forward pass.")
IMAGES = flags.DEFINE_string(
    "images", None, "A folder of images, a JSONL file of {\"image\": path, \"prompt\": text}, or "
    "a datasets folder written by save_to_disk.")
OUT = flags.DEFINE_string(
    "out", None, "Output folder: one store per layer in OUT/layer_<L>/, plus OUT/harvest_flags.json.")
IMAGE_COLUMN = flags.DEFINE_string("image_column", "image", "Image column of a datasets input.")
SPLIT = flags.DEFINE_string("split", "train", "Split of a datasets input saved as a DatasetDict.")
PROMPT = flags.DEFINE_string(
    "prompt", "", "Prompt text for every image; a JSONL or dataset 'prompt' overrides it.")
TOKENS = flags.DEFINE_enum(
    "tokens", "base_patches", list(TOKEN_MODES),
    "Which token rows to store: base_patches (the base image grid, the paper's 576), image (every "
    "image token, anyres tiles and newlines included), text, or all. BOS and padding never.")
STORE_DTYPE = flags.DEFINE_enum(
    "store_dtype", "bfloat16", ["float32", "bfloat16", "float16", "float8_e4m3fn"],
    "dtype of the stored activations (bfloat16 never overflows on residual outliers; "
    "float8_e4m3fn, a quarter of float32's bytes, is scaled per row).")
BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Images per forward pass.", lower_bound=1)
SHARD_IMAGES = flags.DEFINE_integer(
    "shard_images", 128, "Input images per store shard; a multiple of --batch_size so that a "
    "resumed run processes exactly the batches of an uninterrupted one.", lower_bound=1)
MAX_IMAGES = flags.DEFINE_integer(
    "max_images", 0, "Harvest only the first N inputs (0: all).", lower_bound=0)
ON_BAD_IMAGE = flags.DEFINE_enum(
    "on_bad_image", "skip", ["skip", "fail"],
    "skip: leave out an unreadable or missing image and list it in the manifest; fail: stop.")
MAX_IMAGE_PIXELS = flags.DEFINE_integer(
    "max_image_pixels", DEFAULT_MAX_PIXELS,
    "Images with more pixels than this are bad images (skipped and listed, or --on_bad_image=fail "
    "stops); sets PIL.Image.MAX_IMAGE_PIXELS, whose default this is, for the harvest.",
    lower_bound=1)
TORCH_THREADS = flags.DEFINE_integer(
    "torch_threads", 0, "torch intra-op threads (0: torch's default, one per core). On a CPU that "
    "other processes share, 1 avoids threads waiting on each other.", lower_bound=0)
STOP_AFTER_LAST_LAYER = flags.DEFINE_bool(
    "stop_after_last_layer", True,
    "End each forward pass after the last requested layer (skips the later layers and the LM head).")

NUM_WORKERS = flags.DEFINE_integer(
    "num_workers", 0, "Harvest workers writing one store; each takes a contiguous slice of the "
    "shards, writes OUT/layer_<L>/parts/, and the last to finish commits the store. 0: from "
    "SLURM_ARRAY_TASK_COUNT, torchrun's WORLD_SIZE or SLURM_NTASKS, else 1.", lower_bound=0)
WORKER_INDEX = flags.DEFINE_integer(
    "worker_index", -1, "This worker's index in [0, --num_workers). -1: from SLURM_ARRAY_TASK_ID "
    "(less SLURM_ARRAY_TASK_MIN), torchrun's RANK or SLURM_PROCID, else 0.", lower_bound=-1)


def apply_torch_threads() -> None:
  """Process-wide, so set by the command lines rather than by `harvest()`."""
  if TORCH_THREADS.value:
    torch.set_num_threads(TORCH_THREADS.value)


def config_from_flags() -> HarvestConfig:
  values = {}
  try:
    values["worker_index"], values["num_workers"] = workers.resolve(
        NUM_WORKERS.value, WORKER_INDEX.value, os.environ)
  except workers.WorkerError as e:
    raise HarvestError(str(e)) from e
  for field in dataclasses.fields(HarvestConfig):
    if field.name in values:
      continue
    flag = flags.FLAGS[field.name]
    if field.name in ("model", "layers", "images", "out") and not flag.value:
      raise HarvestError(f"--{field.name} is required")
    values[field.name] = flag.value
  try:
    values["layers"] = tuple(int(layer) for layer in values["layers"])
  except ValueError as e:
    raise HarvestError(f"--layers={','.join(values['layers'])}: not integers") from e
  return HarvestConfig(**values)
