"""Shared pytest fixtures: tiny LLaVA checkpoints and synthetic images, built once per session."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
  """`tiny_model(kind)`: folder of a saved tiny model of that kind (llava, llava_next, ...)."""
  from harvest import tiny
  root = tmp_path_factory.mktemp("tiny_models")
  return lambda kind: tiny.save(kind, root / kind)


@pytest.fixture(scope="session")
def synthetic_images(tmp_path_factory) -> Path:
  """A folder of 96 varied synthetic PNGs (different sizes and aspect ratios)."""
  from harvest import images
  out = tmp_path_factory.mktemp("synthetic_images")
  images.write_synthetic_images(out, 96)
  return out


@pytest.fixture(scope="session", params=["gs", "s3"])
def bucket(request):
  """An object storage emulator on localhost (GCS, then S3), its variables set for this process
  and the commands it starts."""
  import os

  import emulators
  server = emulators.start_gcs() if request.param == "gs" else emulators.start_s3()
  saved = {k: os.environ.get(k) for k in server.env}
  os.environ.update(server.env)
  yield server
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
  server.process.kill()
  server.process.wait()
