"""Opening the images of an image table: file paths (relative or not) and saved-dataset rows."""

import pytest
from PIL import Image

from harvest.images import BadImage
from interpret.sources import ImageTable


def test_relative_paths_are_found_under_the_search_roots(tmp_path):
  (tmp_path / "imgs").mkdir()
  Image.new("RGB", (8, 6), (1, 2, 3)).save(tmp_path / "imgs" / "a.png")
  table = ImageTable([{"id": 0, "source": "imgs/a.png"}, {"id": 1, "source": "imgs/gone.png"}],
                     [tmp_path], where="test table")
  assert table.load(0).getpixel((0, 0)) == (1, 2, 3)
  with pytest.raises(BadImage, match=r"image 1 of test table: source 'imgs/gone.png' not found"):
    table.load(1)
  with pytest.raises(BadImage, match="image id 7 is not in the image table of test table"):
    table.load(7)


def test_corrupt_file_names_the_image(tmp_path):
  (tmp_path / "bad.png").write_bytes(b"not a png")
  with pytest.raises(BadImage, match=r"image 0 \(bad.png\)"):
    ImageTable([{"id": 0, "source": "bad.png"}], [tmp_path]).load(0)


def test_saved_dataset_rows(tmp_path):
  datasets = pytest.importorskip("datasets")
  images = [Image.new("RGB", (8, 8), (i * 50, 0, 0)) for i in range(3)]
  data = datasets.Dataset.from_dict({"picture": images}, features=datasets.Features(
      {"picture": datasets.Image()}))
  data.save_to_disk(str(tmp_path / "plain"))
  datasets.DatasetDict({"val": data}).save_to_disk(str(tmp_path / "dict"))
  table = ImageTable([{"id": 0, "source": f"{tmp_path / 'plain'}[2]"},
                      {"id": 1, "source": f"{tmp_path / 'dict'}#val[1]"}])
  assert table.load(0).getpixel((0, 0)) == (100, 0, 0)
  assert table.load(1).getpixel((0, 0)) == (50, 0, 0)
