"""Opens the images of an image table (a STORE's, or the copy in TOPACTS/images.jsonl) by image id.

A record's `source` is what `harvest` wrote: a file path (as given to the harvest, so possibly
relative to the folder it ran in) or a saved-dataset row `DATASET[#SPLIT][ROW]`. Relative paths are
tried from the current folder, then from each `search_roots` folder (e.g. the folder of the
`--images` JSONL), so the pipeline keeps working when run from elsewhere.
"""

from __future__ import annotations

import re
from pathlib import Path

from PIL import Image

from harvest.images import BadImage, decode_image

_DATASET_ROW = re.compile(r"^(?P<path>.+?)(?:#(?P<split>[^#\[\]]+))?\[(?P<row>\d+)\]$")


class ImageTable:

  def __init__(self, records: list[dict], search_roots: list[str | Path] = (), where: str = ""):
    self._records = {int(r["id"]): r for r in records}
    self._roots = [Path(p) for p in search_roots]
    self._where = where  # names the table in errors, e.g. "--store=/data/store"
    self._datasets = {}

  def record(self, image_id: int) -> dict:
    if image_id not in self._records:
      raise BadImage(f"image id {image_id} is not in the image table of {self._where}")
    return self._records[image_id]

  def load(self, image_id: int) -> Image.Image:
    """The RGB image of `image_id`; BadImage names the id, the source and why it failed."""
    source = self.record(image_id)["source"]
    try:
      path = self._find_file(source)
      if path is not None:
        return decode_image(lambda: Image.open(path))
      match = _DATASET_ROW.match(source)
      if match and Path(match["path"]).is_dir():
        return decode_image(lambda: self._dataset_image(match["path"], match["split"], int(match["row"])))
    except BadImage as e:
      raise BadImage(f"image {image_id} ({source}) of {self._where}: {e}") from e
    tried = [str(Path(source))] + [str(root / source) for root in self._roots]
    raise BadImage(f"image {image_id} of {self._where}: source {source!r} not found "
                   f"(tried {tried}); run from the harvest's folder or pass --image_root")

  def _find_file(self, source: str) -> Path | None:
    for candidate in [Path(source)] + [root / source for root in self._roots]:
      if candidate.is_file():
        return candidate
    return None

  def _dataset_image(self, path: str, split: str | None, row: int) -> Image.Image:
    import datasets  # only saved-dataset sources need it
    if (path, split) not in self._datasets:
      loaded = datasets.load_from_disk(path)
      self._datasets[(path, split)] = loaded[split] if split else loaded
    dataset = self._datasets[(path, split)]
    image_columns = [c for c, f in dataset.features.items() if isinstance(f, datasets.Image)]
    value = dataset[row][image_columns[0] if image_columns else "image"]
    return Image.open(value) if isinstance(value, str) else value


def open_table(topacts, store: str | None, image_root: str | None) -> ImageTable:
  """The image table from `--store` if given, else from TOPACTS/images.jsonl."""
  roots = [image_root] if image_root else []
  if store:
    from sae_jax.store import Store
    return ImageTable(Store(store, allow_incomplete=True).images(), roots + [store],
                      where=f"--store={store}")
  return ImageTable(topacts.images(), roots + [topacts.path],
                    where=f"{topacts.path / 'images.jsonl'}")
