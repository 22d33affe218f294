"""Object storage servers on localhost for the tests: gcp-storage-emulator (the GCS JSON API) and
moto in server mode (S3), both from the dev extra, each started once per session."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BUCKET = "acts"


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _binary(name: str) -> str:
  """A console script of the dev extra: beside this Python (a venv), else on PATH."""
  beside = Path(sys.executable).parent / name
  return str(beside) if beside.exists() else shutil.which(name) or name


def _start(command: list[str], port: int) -> subprocess.Popen:
  process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 60
  while time.monotonic() < deadline:
    try:
      socket.create_connection(("127.0.0.1", port), timeout=1).close()
      return process
    except OSError:
      time.sleep(0.1)
  process.kill()
  raise RuntimeError(f"{command[0]} did not listen on port {port}")


def _request(url: str, method: str, body: dict | None = None) -> None:
  data = json.dumps(body).encode() if body is not None else None
  urllib.request.urlopen(urllib.request.Request(
      url, data=data, method=method, headers={"Content-Type": "application/json"}))


class Server:
  """One emulator: `env` points clients at it, `url(path)` names a path in its bucket."""

  def __init__(self, scheme: str, process: subprocess.Popen, env: dict):
    self.scheme, self.process, self.env = scheme, process, env

  def url(self, path: str) -> str:
    return f"{self.scheme}://{BUCKET}/{path}"


def start_gcs() -> Server:
  port = free_port()
  process = _start([_binary("gcp-storage-emulator"), "start", "--host=127.0.0.1", f"--port={port}", "--in-memory"],
                   port)
  _request(f"http://127.0.0.1:{port}/storage/v1/b?project=test", "POST", {"name": BUCKET})
  # A test token: tensorstore sends no credentials of this host to the emulator.
  return Server("gs", process, {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}",
                                "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
                                "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"})


def start_s3() -> Server:
  port = free_port()
  process = _start([_binary("moto_server"), "-H", "127.0.0.1", "-p", str(port)], port)
  _request(f"http://127.0.0.1:{port}/{BUCKET}", "PUT")
  # Test keys, and no instance-metadata lookup: only localhost is ever contacted.
  return Server("s3", process, {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
                                "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                                "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"})
