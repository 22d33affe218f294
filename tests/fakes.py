"""Fakes for the interpret tests: a TOPACTS folder of chosen arrays, and a scripted OpenAI server.

Fake images are solid colours whose red channel encodes the image id (`RED_STEP * id`), and every
latent's first top image is active on all patches, so the server can tell which latent a request is
about from the first image's pixels alone (`FakeOpenAIServer.latent_of`).
"""

from __future__ import annotations

import base64
import collections
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image

from sae_jax.formats import topacts

RED_STEP = 20
GRID = (4, 4)


def write_topacts(path: Path, num_latents: int = 8, top_n: int = 3,
                  no_images: tuple[int, ...] = (7,)) -> Path:
  """TOPACTS for `num_latents` latents; latent i's first image is image i (fully active)."""
  path.mkdir(parents=True, exist_ok=True)
  (path / "images").mkdir(exist_ok=True)
  num_images = num_latents + top_n
  records = []
  for j in range(num_images):
    Image.new("RGB", (40 + j, 30), (RED_STEP * j % 256, 100, 200)).save(path / "images" / f"{j}.png")
    records.append({"id": j, "source": f"images/{j}.png", "prompt": "<image>", "grid": list(GRID)})
  rng = np.random.default_rng(0)
  patches = GRID[0] * GRID[1]
  top_images = np.stack([np.arange(i, i + top_n) for i in range(num_latents)]).astype(np.int64)
  maps = rng.uniform(0, 1, (num_latents, top_n, patches)) * (rng.uniform(size=(num_latents, top_n, patches)) < 0.4)
  maps[:, 0] = rng.uniform(0.5, 2.0, (num_latents, patches))  # the first image: active everywhere
  scores = maps.mean(-1)
  for i in no_images:
    top_images[i], maps[i], scores[i] = -1, 0, 0
  density = np.linspace(0.001, 0.5, num_latents)
  edges = np.linspace(0, 2, 9)
  histogram = rng.integers(0, 50, (num_latents, len(edges) - 1))
  header = {"num_latents": num_latents, "top_n": top_n, "score": "mean", "grid": list(GRID),
            "store": "fake", "sae": "fake", "k": 4, "rows_scanned": 1000,
            "images_scanned": num_images, "hist_edges": edges.tolist()}
  topacts.write(path, header, {"top_images": top_images, "top_scores": scores, "top_maps": maps,
                               "density": density, "histogram": histogram}, records)
  return path


def reply(text: str):
  return ("reply", text)


def explanation(latent: int) -> str:
  return f"Some thoughts.\n[EXPLANATION]: pattern number {latent}"


class FakeOpenAIServer:
  """A real HTTP server on 127.0.0.1 speaking enough of the OpenAI chat-completions protocol.

  `script(latent, attempt)` (attempt counts from 1 per latent) returns one of
    ("reply", text)            200 with a chat completion whose content is `text`
    ("status", code)           an HTTP error with that code
    ("sleep", seconds, text)   sleeps, then replies (a client with a shorter timeout gives up)
    ("garbage",)               200 with a body that is not JSON
    ("die",)                   drops the connection and stops serving: later requests are refused
  """

  def __init__(self, script=lambda latent, attempt: reply(explanation(latent))):
    self.script = script
    self.requests = collections.Counter()  # latent -> chat requests received
    self.bodies: list[dict] = []
    self.headers: list[dict] = []
    self._lock = threading.Lock()
    server = self

    class Handler(BaseHTTPRequestHandler):
      def log_message(self, *args):  # keep test output quiet
        pass

      def _send(self, code: int, body: bytes):
        try:
          self.send_response(code)
          self.send_header("Content-Type", "application/json")
          self.send_header("Content-Length", str(len(body)))
          self.end_headers()
          self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
          pass  # the client timed out and left

      def do_GET(self):
        if self.path.rstrip("/").endswith("/models"):
          self._send(200, json.dumps({"data": [{"id": "fake-model"}]}).encode())
        else:
          self._send(404, b"{}")

      def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        latent = server.latent_of(body)
        with server._lock:
          server.requests[latent] += 1
          attempt = server.requests[latent]
          server.bodies.append(body)
          server.headers.append(dict(self.headers))
        action = server.script(latent, attempt)
        if action[0] == "status":
          self._send(action[1], json.dumps({"error": "injected"}).encode())
          return
        if action[0] == "die":
          self.close_connection = True
          threading.Thread(target=server.die).start()  # shutdown() waits for serve_forever
          return
        if action[0] == "garbage":
          self._send(200, b"<html>not json")
          return
        if action[0] == "sleep":
          time.sleep(action[1])
        completion = {"id": "x", "object": "chat.completion", "model": body["model"],
                      "choices": [{"index": 0, "finish_reason": "stop",
                                   "message": {"role": "assistant", "content": action[-1]}}]}
        self._send(200, json.dumps(completion).encode())

    self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self._server.daemon_threads = True
    self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"
    self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

  @staticmethod
  def latent_of(body: dict) -> int:
    """The latent a request is about: the red channel of its first image's top-left pixel."""
    parts = next(m for m in body["messages"] if m["role"] == "user")["content"]
    url = next(p["image_url"]["url"] for p in parts if p["type"] == "image_url")
    image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
    return round(image.getpixel((0, 0))[0] / RED_STEP)

  def die(self):
    self._server.shutdown()
    self._server.server_close()

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._server.shutdown()
    self._server.server_close()
