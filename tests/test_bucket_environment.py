"""Opening, writing and reading a bucket leaves os.environ as it was: the GCS emulator's endpoint
reaches tensorstore as its flag, and an emulator without a test token is refused."""

import os
import urllib.parse
import urllib.request

import pytest

import emulators
from sae_jax.store import open_location
from sae_jax.store.location import LocationError


@pytest.fixture(params=["gs", "s3"])
def bucket(request, monkeypatch):
  """An emulator of this module's own. The GCS emulator answers tensorstore's ranged listing with
  every object of the bucket, and tensorstore aborts on a name shorter than the listed prefix, so
  this module's short object names stay out of the emulator the other tests share."""
  server = emulators.start_gcs() if request.param == "gs" else emulators.start_s3()
  for name, value in server.env.items():
    monkeypatch.setenv(name, value)
  yield server
  server.process.kill()
  server.process.wait()


def test_a_bucket_round_trip_writes_nothing_into_the_environment(bucket, tmp_path):
  before = dict(os.environ)
  location = open_location(bucket.url(f"{tmp_path.name}/env"))
  location.write("a.bin", b"written through tensorstore")
  assert location.read("a.bin") == b"written through tensorstore"
  assert dict(os.environ) == before
  if bucket.scheme == "gs":  # the object is in the emulator, read by its own JSON API
    name = urllib.parse.quote(f"{tmp_path.name}/env/a.bin", safe="")
    with urllib.request.urlopen(f"{bucket.env['STORAGE_EMULATOR_HOST']}/storage/v1/b/acts/o/"
                                f"{name}?alt=media") as response:
      assert response.read() == b"written through tensorstore"


@pytest.mark.parametrize("bucket", ["gs"], indirect=True)
def test_an_emulator_without_a_test_token_is_refused_in_one_line(bucket, monkeypatch):
  monkeypatch.delenv("GOOGLE_AUTH_TOKEN_FOR_TESTING")
  before = dict(os.environ)
  with pytest.raises(LocationError) as error:
    open_location(bucket.url("store"))
  assert str(error.value).startswith("gs://acts/store: ") and "\n" not in str(error.value)
  assert "GOOGLE_AUTH_TOKEN_FOR_TESTING" in str(error.value)
  assert dict(os.environ) == before
