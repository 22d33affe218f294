"""Explainer clients: turn a `Prompt` into the model's answer text.

* `OpenAIExplainer`: any OpenAI-compatible chat-completions server (vLLM, SGLang, hosted APIs),
  images as base64 PNG data URLs. Thread-safe (one urllib request per call), so a job keeps many
  requests in flight and the server's continuous batching fills the accelerator.
* `EndpointPool`: several such servers serving one model, balanced by outstanding requests; one
  that dies is left out and the job goes on with the others.
* `HFExplainer`: a local transformers image-text model (LLaVA-OneVision, LLaVA-NeXT, Qwen2-VL, ...)
  through AutoProcessor, its chat template and AutoModelForImageTextToText. Calls are serialised.

Errors: `TransientError` is worth retrying (timeouts, connection drops, 5xx, 429, garbled bodies);
`ExplainerError` is not (e.g. 400 for one prompt); `fatal=True` means no request can succeed
(unreachable server, wrong key, unknown model) and the job should stop.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import socket
import sys
import threading
import urllib.error
import urllib.request

from interpret.prompts import Prompt

_RETRYABLE_HTTP = {408, 409, 425, 429}
_FATAL_HTTP = {401, 403, 404}


class ExplainerError(Exception):

  def __init__(self, message: str, fatal: bool = False):
    super().__init__(message)
    self.fatal = fatal


class TransientError(ExplainerError):
  """A failure that may pass: retry with backoff."""


class Unreachable(TransientError):
  """No HTTP answer at all: connection refused or dropped, timeout, bad host."""


def _data_url(png: bytes) -> str:
  return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


class OpenAIExplainer:

  def __init__(self, base_url: str, model: str | None, api_key: str | None, *, timeout_s: float,
               max_tokens: int, temperature: float, multi_images: bool = False):
    self.base_url = base_url.rstrip("/")
    self._api_key = api_key  # kept off every log, record and repr
    self.timeout_s, self.max_tokens, self.temperature = timeout_s, max_tokens, temperature
    self.multi_images = multi_images
    self.name = self._preflight(model)  # the model id sent and recorded

  def __repr__(self) -> str:
    return f"OpenAIExplainer({self.base_url!r}, model={self.name!r})"

  @property
  def identity(self) -> dict:
    """What determines an answer besides the prompt: part of the cache key."""
    return {"backend": "openai", "model": self.name, "max_tokens": self.max_tokens,
            "temperature": self.temperature, "multi_images": self.multi_images}

  def _request(self, path: str, body: dict | None = None) -> dict:
    headers = {"Content-Type": "application/json"}
    if self._api_key:
      headers["Authorization"] = f"Bearer {self._api_key}"
    data = json.dumps(body).encode() if body is not None else None
    url = self.base_url + path
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
      with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
        raw = response.read()
    except urllib.error.HTTPError as e:
      detail = e.read()[:300].decode("utf-8", "replace")
      message = f"{url}: HTTP {e.code} {detail}"
      if e.code in _RETRYABLE_HTTP or e.code >= 500:
        raise TransientError(message) from None
      raise ExplainerError(message, fatal=e.code in _FATAL_HTTP) from None
    except urllib.error.URLError as e:
      if isinstance(e.reason, (socket.timeout, TimeoutError)):
        raise Unreachable(f"{url}: timed out after {self.timeout_s}s") from None
      raise Unreachable(f"{url}: {e.reason}") from None
    except (socket.timeout, TimeoutError):
      raise Unreachable(f"{url}: timed out after {self.timeout_s}s") from None
    except (ConnectionError, http.client.HTTPException) as e:
      raise Unreachable(f"{url}: {type(e).__name__}: {e}") from None
    try:
      return json.loads(raw)
    except json.JSONDecodeError:
      raise TransientError(f"{url}: the reply is not JSON: {raw[:200]!r}") from None

  def _preflight(self, model: str | None) -> str:
    """Fails fast on an unreachable server; finds the served model when `model` is None."""
    try:
      models = self._request("/models").get("data", [])
    except Unreachable as e:
      raise ExplainerError(f"--explainer=openai:{self.base_url} is unreachable ({e}); start the "
                           "server or fix the URL", fatal=True) from None
    except ExplainerError as e:
      if model:  # a server without /models is fine when the model is named
        return model
      raise ExplainerError(f"--explainer=openai:{self.base_url} does not list its models ({e}); "
                           "pass --explainer_model", fatal=True) from None
    if model:
      return model
    if not models:
      raise ExplainerError(f"--explainer=openai:{self.base_url} lists no models; pass "
                           "--explainer_model", fatal=True)
    return models[0]["id"]

  def body(self, prompt: Prompt) -> dict:
    return chat_body(prompt, self.name, max_tokens=self.max_tokens, temperature=self.temperature,
                     multi_images=self.multi_images)

  def complete(self, prompt: Prompt) -> str:
    return reply_text(self._request("/chat/completions", self.body(prompt)), prompt.answer_prefix,
                      f"{self.base_url}/chat/completions")


def chat_body(prompt: Prompt, model: str, *, max_tokens: int, temperature: float,
              multi_images: bool) -> dict:
  """The chat-completions request body of `prompt`: sent to a server, or written to a batch file."""
  image_parts = []
  for png in prompt.images:
    part = {"type": "image_url", "image_url": {"url": _data_url(png)}}
    if multi_images:  # SGLang: one base-resolution view per image (729 tokens on OneVision)
      part["modalities"] = "multi-images"
    image_parts.append(part)
  messages = [{"role": "system", "content": prompt.system},
              {"role": "user", "content": [{"type": "text", "text": prompt.user}, *image_parts]}]
  body = {"model": model, "messages": messages, "max_tokens": max_tokens,
          "temperature": temperature}
  if prompt.answer_prefix:
    messages.append({"role": "assistant", "content": prompt.answer_prefix})
    # vLLM's and SGLang's way to continue a partial assistant message.
    body.update(continue_final_message=True, add_generation_prompt=False)
  return body


def reply_text(reply, answer_prefix: str, where: str) -> str:
  """The answer in a chat completion (a server's reply, or a batch output line's body), after the
  prompt's `answer_prefix`."""
  try:
    content = reply["choices"][0]["message"]["content"]
  except (KeyError, IndexError, TypeError):
    raise TransientError(f"{where}: no choices[0].message.content in "
                         f"{json.dumps(reply)[:200]}") from None
  return answer_prefix + (content or "")


class HFExplainer:

  def __init__(self, path: str, *, max_tokens: int, device: str = "cpu", dtype: str = "auto"):
    import torch
    import transformers
    self.path, self.name, self.max_tokens, self.device = path, path, max_tokens, device
    try:
      self.processor = transformers.AutoProcessor.from_pretrained(path)
      self.model = transformers.AutoModelForImageTextToText.from_pretrained(
          path, dtype=dtype if dtype == "auto" else getattr(torch, dtype)).to(device).eval()
    except (OSError, ValueError) as e:
      raise ExplainerError(f"--explainer=hf:{path}: cannot load an image-text model ({e})",
                           fatal=True) from e
    self._lock = threading.Lock()  # one generate at a time: the model is not re-entrant

  def __repr__(self) -> str:
    return f"HFExplainer({self.path!r})"

  @property
  def identity(self) -> dict:
    return {"backend": "hf", "model": self.path, "max_tokens": self.max_tokens,
            "dtype": str(self.model.dtype)}

  def complete(self, prompt: Prompt) -> str:
    import torch
    try:
      text, images = hf_chat(self.processor, prompt)
      # Floating inputs (pixel values) in the model's dtype; token ids stay integers.
      inputs = self.processor(text=text, images=images or None, return_tensors="pt").to(
          self.device, dtype=self.model.dtype)
      with self._lock, torch.inference_mode():
        out = self.model.generate(**inputs, max_new_tokens=self.max_tokens, do_sample=False)
    except (ValueError, RuntimeError) as e:  # e.g. a prompt too long, out of memory: this latent only
      raise ExplainerError(f"hf:{self.path}: {type(e).__name__}: {e}") from e
    new_tokens = out[:, inputs["input_ids"].shape[1]:]
    return prompt.answer_prefix + self.processor.batch_decode(new_tokens,
                                                              skip_special_tokens=True)[0]


class EndpointPool:
  """Several OpenAI-compatible servers serving one model, as one explainer.

  Each request goes to the live server with the fewest requests outstanding. A server that does
  not answer at all (connection refused, timeout) passes the request straight on to another; after
  `max_unreachable` such failures in a row it takes no more requests, and the job goes on with the
  rest. Only when every server is down does the job stop.
  """

  def __init__(self, endpoints: list[OpenAIExplainer], max_unreachable: int = 3):
    names = {e.name for e in endpoints}
    if len(names) > 1:
      raise ExplainerError("--explainer: the servers serve different models ("
                           + ", ".join(f"{e.base_url}: {e.name}" for e in endpoints)
                           + "); pass --explainer_model", fatal=True)
    self.endpoints, self.max_unreachable = endpoints, max_unreachable
    self.name = endpoints[0].name
    self.outstanding = {e.base_url: 0 for e in endpoints}
    self.unreachable = {e.base_url: 0 for e in endpoints}  # failures in a row
    self.answered = {e.base_url: 0 for e in endpoints}
    self._lock = threading.Lock()

  def __repr__(self) -> str:
    return f"EndpointPool({[e.base_url for e in self.endpoints]!r}, model={self.name!r})"

  @property
  def identity(self) -> dict:
    return self.endpoints[0].identity  # the same model and settings on every server

  def _live(self) -> list[OpenAIExplainer]:
    return [e for e in self.endpoints if self.unreachable[e.base_url] < self.max_unreachable]

  def _pick(self, tried: set[str]) -> OpenAIExplainer | None:
    with self._lock:
      live = self._live()
      if not live:
        raise ExplainerError("--explainer: every server is unreachable ("
                             + ", ".join(e.base_url for e in self.endpoints) + ")", fatal=True)
      candidates = [e for e in live if e.base_url not in tried]
      if not candidates:
        return None
      chosen = min(candidates, key=lambda e: self.outstanding[e.base_url])
      self.outstanding[chosen.base_url] += 1
      return chosen

  def complete(self, prompt: Prompt) -> str:
    tried, last_error = set(), None
    while (endpoint := self._pick(tried)) is not None:
      url = endpoint.base_url
      tried.add(url)
      try:
        answer = endpoint.complete(prompt)
      except Unreachable as e:
        last_error = e
        with self._lock:
          self.unreachable[url] += 1
        continue
      finally:
        with self._lock:
          self.outstanding[url] -= 1
      with self._lock:
        self.unreachable[url] = 0
        self.answered[url] += 1
      return answer
    raise last_error  # every live server failed this request: retried with backoff


def hf_chat(processor, prompt: Prompt) -> tuple[str, list]:
  """(text, PIL images) a transformers processor is given for `prompt`: its chat template, ready
  for the answer, which starts with the prompt's answer prefix."""
  from PIL import Image
  images = [Image.open(io.BytesIO(png)).convert("RGB") for png in prompt.images]
  messages = [{"role": "system", "content": [{"type": "text", "text": prompt.system}]},
              {"role": "user", "content": [{"type": "text", "text": prompt.user}]
               + [{"type": "image"} for _ in images]}]
  text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
  return text + prompt.answer_prefix, images


def make_explainer(spec: str, model: str | None, api_key: str | None, *, timeout_s: float,
                   max_tokens: int, temperature: float, multi_images: bool, device: str,
                   dtype: str):
  """`openai:URL`, `openai:URL1,openai:URL2,...` or `hf:PATH` (the --explainer flag) to a client.

  Of several servers, one unreachable at the start is left out (with a warning on stderr).
  """
  specs = spec.split(",")
  if len(specs) > 1:
    if not all(s.startswith("openai:") and len(s) > len("openai:") for s in specs):
      raise ExplainerError(f"--explainer={spec!r}: several explainers must all be "
                           "openai:http://host:port/v1", fatal=True)
    endpoints = []
    for one in specs:
      try:
        endpoints.append(OpenAIExplainer(one[len("openai:"):], model, api_key, timeout_s=timeout_s,
                                         max_tokens=max_tokens, temperature=temperature,
                                         multi_images=multi_images))
      except ExplainerError as e:
        print(f"warning: leaving out {one}: {e}", file=sys.stderr)
    if not endpoints:
      raise ExplainerError(f"--explainer={spec!r}: no server is reachable", fatal=True)
    return EndpointPool(endpoints)

  kind, sep, target = spec.partition(":")
  if kind == "openai" and sep and target:
    return OpenAIExplainer(target, model, api_key, timeout_s=timeout_s, max_tokens=max_tokens,
                           temperature=temperature, multi_images=multi_images)
  if kind == "hf" and sep and target:
    return HFExplainer(target, max_tokens=max_tokens, device=device, dtype=dtype)
  raise ExplainerError(f"--explainer={spec!r}: expected openai:http://host:port/v1 or hf:PATH",
                       fatal=True)
