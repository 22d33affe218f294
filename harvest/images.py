"""Harvest inputs: synthetic test images, and readers for the three kinds of `--images`.

`--images` is one of
  * a folder of images (searched recursively, sorted by path, so the order never depends on the
    file system),
  * a JSONL file of `{"image": path, "prompt": optional text}` (relative paths are relative to the
    JSONL file's folder),
  * a folder written by `datasets.Dataset.save_to_disk` with an image column.

Each reader is a sequence of inputs: `source(i)` names input i for the store's image table and
`prompt(i)` is its own prompt (or None); `load(i)` decodes its image, raising `BadImage`.
`python -m harvest.images --out=DIR --num=64` writes varied synthetic PNGs (seeded) for tests, and
DIR/concepts.jsonl, what each one shows where (`concept_masks` turns a line into masks).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from sae_jax.files import atomic_write_bytes

# PIL's own default, read before anything changes it: the default of --max_image_pixels.
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class BadImage(Exception):
  """An input image that cannot be read: missing, not an image, truncated, too many pixels."""


class InputError(ValueError):
  """`--images` (or a file it names) cannot be used at all."""


@contextlib.contextmanager
def pixel_limit(max_pixels: int):
  """Sets PIL's decompression-bomb limit (a module global, so process-wide) and restores it."""
  old, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_pixels
  try:
    yield
  finally:
    Image.MAX_IMAGE_PIXELS = old


def _over_pixel_limit(detail: str) -> BadImage:
  return BadImage(f"{detail}, over the pixel limit of {Image.MAX_IMAGE_PIXELS} "
                  "(PIL.Image.MAX_IMAGE_PIXELS; the harvest's --max_image_pixels)")


def decode_image(opener) -> Image.Image:
  """RGB image from `opener()`, decoded now so that a truncated file fails here, not later.

  An image over PIL's pixel limit is bad too: PIL itself only warns up to twice the limit and
  raises an error of its own beyond, which would otherwise escape as an unnamed crash.
  """
  try:
    image = opener()
    width, height = image.size
    if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
      raise _over_pixel_limit(f"{width}x{height} = {width * height} pixels")
    image.load()
    return image.convert("RGB")
  except Image.DecompressionBombError as e:  # "Image size (N pixels) exceeds limit of 2x..."
    pixels = re.search(r"\d+ pixels", str(e))
    raise _over_pixel_limit(pixels.group() if pixels else str(e)) from e
  except (OSError, ValueError, SyntaxError) as e:  # PIL raises these three for bad files
    raise BadImage(f"{type(e).__name__}: {e}") from e


class FileInputs:
  """Images named by paths, with optional per-image prompts (a folder or a JSONL file)."""

  def __init__(self, paths: list[str], prompts: list[str | None]):
    self._paths, self._prompts = paths, prompts

  def __len__(self) -> int:
    return len(self._paths)

  def source(self, i: int) -> str:
    return self._paths[i]

  def prompt(self, i: int) -> str | None:
    return self._prompts[i]

  def load(self, i: int) -> Image.Image:
    return decode_image(lambda: Image.open(self._paths[i]))


class DatasetInputs:
  """Rows of a `datasets` dataset saved with `save_to_disk`: PIL images or paths in a column."""

  def __init__(self, path: str, column: str, split: str):
    import datasets  # only this reader needs it
    loaded = datasets.load_from_disk(path)
    if isinstance(loaded, datasets.DatasetDict):
      if split not in loaded:
        raise InputError(f"--images={path}: dataset has splits {sorted(loaded)}, not --split={split}")
      loaded, self._name = loaded[split], f"{path}#{split}"
    else:
      self._name = path
    if column not in loaded.column_names:
      raise InputError(f"--images={path}: no column --image_column={column!r}; "
                       f"columns are {loaded.column_names}")
    self._column = loaded.select_columns([column])
    self._prompts = loaded["prompt"] if "prompt" in loaded.column_names else None

  def __len__(self) -> int:
    return len(self._column)

  def source(self, i: int) -> str:
    return f"{self._name}[{i}]"

  def prompt(self, i: int) -> str | None:
    return self._prompts[i] if self._prompts is not None else None

  def load(self, i: int) -> Image.Image:
    def opener():
      value = self._column[i][self._column.column_names[0]]  # decoding errors surface here
      if isinstance(value, str):
        return Image.open(value)
      if isinstance(value, Image.Image):
        return value
      raise ValueError(f"the column holds a {type(value).__name__}, not an image or a path")
    return decode_image(opener)


def _read_jsonl(path: Path) -> FileInputs:
  paths, prompts = [], []
  with open(path) as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        image = record["image"]
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise InputError(f"{path}:{line_no}: expected a JSON object with an \"image\" key ({e})")
      paths.append(str(path.parent / image))
      prompts.append(record.get("prompt"))
  return FileInputs(paths, prompts)


def open_inputs(images: str, image_column: str = "image", split: str = "train"):
  """The reader for `--images`: a folder of images, a JSONL file or a saved dataset."""
  path = Path(images)
  if not path.exists():
    raise InputError(f"--images={images} does not exist")
  if path.is_file():
    if path.suffix != ".jsonl":
      raise InputError(f"--images={images} is a file but not a .jsonl list of images")
    return _read_jsonl(path)
  if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
    return DatasetInputs(images, image_column, split)
  files = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
  if not files:
    raise InputError(f"--images={images} holds no image files ({sorted(IMAGE_SUFFIXES)})")
  return FileInputs(files, [None] * len(files))


def inputs_fingerprint(inputs) -> str:
  """sha256 of every input's source and prompt: a store is only resumed over the same inputs."""
  digest = hashlib.sha256()
  for i in range(len(inputs)):
    digest.update(json.dumps([inputs.source(i), inputs.prompt(i)]).encode() + b"\n")
  return digest.hexdigest()


# --- Synthetic images -----------------------------------------------------------------------------

TEXTURES = ("flat", "gradient", "stripes", "checkerboard", "noise")
SHAPES = ("ellipse", "rectangle", "triangle", "line")
# Named colours a shape's fill is labelled with (the nearest in RGB): the colour concepts.
COLOURS = {"black": (0, 0, 0), "white": (255, 255, 255), "grey": (128, 128, 128),
           "red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220),
           "yellow": (230, 220, 40), "cyan": (40, 210, 220), "magenta": (210, 40, 210),
           "orange": (240, 140, 20), "purple": (120, 40, 160), "brown": (130, 80, 30)}
CONCEPTS_FILE = "concepts.jsonl"


# The miniature world's scenes (harvest.world): square, shapes in these colours only, on grey.
WORLD_SIZE = 64
WORLD_COLOURS = ("red", "green", "blue", "yellow", "cyan", "magenta", "orange", "purple")
WORLD_SHAPES = ("ellipse", "rectangle", "triangle")
STYLES = ("varied", "world")


def _background(rng: np.random.Generator, height: int, width: int,
                grey: bool = False) -> tuple[np.ndarray, str]:
  """The background pixels and its texture, one of TEXTURES (`grey`: two grey levels, which no
  world colour is named after)."""
  if grey:  # two levels far enough apart that the texture shows
    level = int(rng.integers(0, 256))
    c1, c2 = np.full(3, level), np.full(3, (level + int(rng.integers(80, 177))) % 256)
  else:
    c1, c2 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
  y, x = np.mgrid[0:height, 0:width]
  style = rng.integers(5)
  if style == 0:
    t = np.zeros((height, width))
  elif style == 1:
    t = (x / max(width - 1, 1) + y / max(height - 1, 1)) / 2
  elif style == 2:
    t = ((x * np.cos(rng.uniform(0, np.pi)) + y) // rng.integers(3, 12)) % 2
  elif style == 3:
    step = rng.integers(4, 16)
    t = ((x // step + y // step) % 2).astype(float)
  else:
    t = rng.random((height, width))
  return (c1 + t[..., None] * (c2 - c1)).astype(np.uint8), TEXTURES[style]


def colour_name(rgb) -> str:
  return min(COLOURS, key=lambda name: sum((int(a) - b) ** 2 for a, b in zip(rgb, COLOURS[name])))


def _scene(seed: int) -> tuple[np.ndarray, dict]:
  """The background pixels and the scene record (what `concepts.jsonl` holds) of one seed."""
  rng = np.random.default_rng(seed)
  height, width = (int(v) for v in rng.integers(40, 200, 2))
  background, texture = _background(rng, height, width)
  shapes = []
  for _ in range(rng.integers(1, 5)):
    rgb = [int(c) for c in rng.integers(0, 256, 3)]
    x0, x1 = sorted(int(v) for v in rng.integers(0, width, 2))
    y0, y1 = sorted(int(v) for v in rng.integers(0, height, 2))
    shape = SHAPES[rng.integers(4)]
    line_width = int(rng.integers(1, 6)) if shape == "line" else None
    shapes.append({"shape": shape, "colour": colour_name(rgb), "rgb": rgb,
                   "box": [x0, y0, x1, y1], "line_width": line_width})
  return background, {"seed": seed, "size": [width, height], "texture": texture, "shapes": shapes}


def _world_scene(seed: int) -> tuple[np.ndarray, dict]:
  """A world scene: 4 shapes in distinct WORLD_COLOURS (slightly jittered) on a grey texture, so
  that every concept covers whole patches of an 8x8 grid and a caption can name it. The shapes
  (3/8 to 11/16 of the side) leave about half the image to the background and a tenth to a
  fifth to each shape: neither a texture nor a colour covers so much of an image that a latent's
  map placed at random would match it."""
  rng = np.random.default_rng(seed)
  side = WORLD_SIZE
  background, texture = _background(rng, side, side, grey=True)
  shapes = []
  for colour in rng.choice(WORLD_COLOURS, 4, replace=False):
    rgb = [int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in COLOURS[colour]]
    w, h = (int(v) for v in rng.integers(side * 3 // 8, side * 11 // 16, 2))
    x0, y0 = int(rng.integers(0, side - w)), int(rng.integers(0, side - h))
    shapes.append({"shape": WORLD_SHAPES[rng.integers(len(WORLD_SHAPES))], "colour": str(colour),
                   "rgb": rgb, "box": [x0, y0, x0 + w, y0 + h], "line_width": None})
  return background, {"seed": seed, "size": [side, side], "texture": texture, "shapes": shapes}


def scene(seed: int, style: str = "varied") -> tuple[np.ndarray, dict]:
  """The background pixels and the scene record of one seed in one of STYLES."""
  if style not in STYLES:
    raise ValueError(f"unknown scene style {style!r}; expected one of {STYLES}")
  return _world_scene(seed) if style == "world" else _scene(seed)


def _draw(draw: ImageDraw.ImageDraw, shapes: list[dict], fills: list) -> None:
  """The one drawing of a scene's shapes, for the image (fills: colours) and for its masks."""
  for spec, fill in zip(shapes, fills):
    x0, y0, x1, y1 = spec["box"]
    if spec["shape"] == "ellipse":
      draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif spec["shape"] == "rectangle":
      draw.rectangle([x0, y0, x1, y1], fill=fill)
    elif spec["shape"] == "triangle":
      draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) // 2, y0)], fill=fill)
    else:
      draw.line([x0, y0, x1, y1], fill=fill, width=spec["line_width"])


def render(background: np.ndarray, record: dict) -> Image.Image:
  """The image of a scene: its shapes drawn over its background."""
  image = Image.fromarray(background)
  _draw(ImageDraw.Draw(image), record["shapes"], [tuple(s["rgb"]) for s in record["shapes"]])
  return image


def synthetic_image(seed: int, style: str = "varied") -> Image.Image:
  """An image from one seed: varied (size, aspect ratio, background texture, 1-4 shapes) or a
  world scene."""
  return render(*scene(seed, style))


def shape_owner(scene: dict) -> np.ndarray:
  """[height, width] uint8: which shape (1-based, in drawing order) each pixel shows; 0 is the
  background."""
  width, height = scene["size"]
  owner = Image.new("L", (width, height), 0)
  _draw(ImageDraw.Draw(owner), scene["shapes"], range(1, len(scene["shapes"]) + 1))
  return np.asarray(owner)


def concept_masks(scene: dict) -> dict[str, np.ndarray]:
  """{"shape:NAME" | "colour:NAME" | "texture:NAME": [height, width] bool} of a scene record.

  Shapes are redrawn, in order, into a map of which shape each pixel shows last, so a mask holds
  only the visible part (later shapes cover earlier ones). The texture is the visible background.
  """
  unknown = [s["shape"] for s in scene["shapes"] if s["shape"] not in SHAPES]
  if unknown or scene["texture"] not in TEXTURES:
    raise ValueError(f"unknown shape {unknown[0]!r}" if unknown else
                     f"unknown texture {scene['texture']!r}")
  owner = shape_owner(scene)
  masks = {f"texture:{scene['texture']}": owner == 0}
  for i, spec in enumerate(scene["shapes"], 1):
    for concept in (f"shape:{spec['shape']}", f"colour:{spec['colour']}"):
      masks[concept] = masks.get(concept, False) | (owner == i)
  return {name: mask for name, mask in masks.items() if mask.any()}


def _name(i: int) -> str:
  return f"synthetic_{i:05d}.png"


class OtherScenesError(ValueError):
  """An --out folder whose images were drawn from other seeds or another style."""


def _records(num: int, seed: int, style: str) -> list[dict]:
  return [{"image": _name(i), **scene(seed + i, style)[1]} for i in range(num)]


def _refuse_other_scenes(out: Path, records: list[dict], seed: int, style: str) -> None:
  """Raises OtherScenesError where OUT/concepts.jsonl records other scenes for these images."""
  path = out / CONCEPTS_FILE
  if not path.exists():
    return
  held = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  for old, new in zip(held, records):
    if old != new:
      raise OtherScenesError(
          f"{path}: {old.get('image')} was drawn from seed {old.get('seed')}, not from "
          f"--seed={seed} --style={style} (image i is seed + i); write to another --out")


def write_synthetic_images(out: str | Path, num: int, seed: int = 0,
                           style: str = "varied") -> list[Path]:
  """Writes `num` PNGs (image i from seed + i); existing files are kept, so reruns are cheap, and
  a folder whose concepts.jsonl records other scenes is refused."""
  out = Path(out)
  _refuse_other_scenes(out, _records(num, seed, style), seed, style)
  out.mkdir(parents=True, exist_ok=True)
  paths = []
  for i in range(num):
    path = out / _name(i)
    if not path.exists():
      tmp = path.with_name(f".{path.name}.tmp")
      synthetic_image(seed + i, style).save(tmp, format="PNG")
      tmp.replace(path)
    paths.append(path)
  return paths


def write_concepts(out: str | Path, num: int, seed: int = 0, style: str = "varied") -> Path:
  """OUT/concepts.jsonl: one scene record per image of `write_synthetic_images` (docs/formats.md).
  A file that records other scenes for the same images is refused, not replaced: the folder's
  PNGs would still show them."""
  out = Path(out)
  records = _records(num, seed, style)
  _refuse_other_scenes(out, records, seed, style)
  out.mkdir(parents=True, exist_ok=True)
  path = out / CONCEPTS_FILE
  atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in records).encode())
  return path


if __name__ == "__main__":
  from absl import flags

  from sae_jax import cli

  _OUT = flags.DEFINE_string("out", None, "Folder to write the PNGs to.", required=True)
  _NUM = flags.DEFINE_integer("num", 64, "How many images.")
  _SEED = flags.DEFINE_integer("seed", 0, "Image i is drawn from seed + i.")
  _STYLE = flags.DEFINE_enum("style", "varied", STYLES, "varied: any size, colour and texture; "
                             "world: the miniature world's scenes (harvest.world).")

  def main():
    # The record first: a rerun checks the PNGs it keeps against it.
    concepts = write_concepts(_OUT.value, _NUM.value, _SEED.value, _STYLE.value)
    paths = write_synthetic_images(_OUT.value, _NUM.value, _SEED.value, _STYLE.value)
    print(json.dumps({"ok": True, "out": _OUT.value, "images": len(paths),
                      "concepts": str(concepts)}))

  cli.run(main, (OtherScenesError,))
