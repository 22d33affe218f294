"""The flags of a command that asks a model for text: the explainer (interpret.explain), the label
refiner (eval.clip_score --refine) and the HallusionBench judge (eval.hallucination --judge).

Each names its endpoint by its role (`--explainer`, `--refine`, `--judge`: openai:URL[,URL...] or
hf:PATH) with `--<role>_model`; they share `--api_key_env` (the key is read from the environment,
never from a flag, so it stays out of flags.json and logs) and, where a command sets them,
`--concurrency`, `--max_retries`, `--timeout_s` and `--max_tokens`.
"""

from __future__ import annotations

import dataclasses
import os

from absl import flags

from interpret import explainers


@dataclasses.dataclass(frozen=True)
class Endpoint:
  role: str
  spec: flags.FlagHolder
  model: flags.FlagHolder
  api_key_env: flags.FlagHolder

  def client(self, *, timeout_s: float, max_tokens: int, temperature: float = 0.0,
             multi_images: bool = False, device: str = "cpu", dtype: str = "auto"):
    """The client of --<role> (explainers.make_explainer), the key from --api_key_env."""
    return explainers.make_explainer(
        self.spec.value, self.model.value, os.environ.get(self.api_key_env.value),
        timeout_s=timeout_s, max_tokens=max_tokens, temperature=temperature,
        multi_images=multi_images, device=device, dtype=dtype)


def define_endpoint(role: str, help: str, *, default: str | None = None,
                    model_help: str = "(default: the first model the server lists)",
                    key_help: str = "") -> Endpoint:
  """--<role>, --<role>_model and --api_key_env."""
  return Endpoint(
      role,
      flags.DEFINE_string(role, default, help),
      flags.DEFINE_string(f"{role}_model", None, f"Model name sent to an openai: --{role} "
                          f"{model_help}."),
      flags.DEFINE_string("api_key_env", "OPENAI_API_KEY", "Environment variable holding the "
                          f"API key of an openai: --{role}{key_help} (unset: no Authorization "
                          "header)."))


@dataclasses.dataclass(frozen=True)
class Requests:
  concurrency: flags.FlagHolder
  max_retries: flags.FlagHolder
  timeout_s: flags.FlagHolder
  max_tokens: flags.FlagHolder


def define_requests(what: str, *, timeout_s: float, max_tokens: int) -> Requests:
  """--concurrency, --max_retries, --timeout_s and --max_tokens of the requests to `what`."""
  return Requests(
      flags.DEFINE_integer("concurrency", 16, f"{what} requests in flight.", lower_bound=1),
      flags.DEFINE_integer("max_retries", 4, f"Retries per {what} request on timeouts, "
                           "connection errors, 429 and 5xx.", lower_bound=0),
      flags.DEFINE_float("timeout_s", timeout_s, f"Timeout of each socket operation of a {what} "
                         "request."),
      flags.DEFINE_integer("max_tokens", max_tokens, f"Longest {what} answer, in tokens.",
                           lower_bound=1))
