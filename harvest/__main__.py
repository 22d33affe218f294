"""`python -m harvest`: record activations of a LLaVA model into one store per layer."""

import json
import sys

from absl import app

from harvest.flags import apply_torch_threads, config_from_flags
from harvest.hooks import HookError
from harvest.images import InputError
from harvest.llava import ModelError
from harvest.run import HarvestError, harvest
from harvest.shards import ActivationError
from harvest.tokens import TokenError
from sae_jax.store import StoreError

# Errors that name their flag, file or image: printed as the JSON summary, without a traceback.
USER_ERRORS = (HarvestError, HookError, InputError, ModelError, ActivationError, TokenError,
               StoreError)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  apply_torch_threads()
  try:
    summary = harvest(config_from_flags())
  except USER_ERRORS as e:
    print(json.dumps({"ok": False, "error": str(e)}))
    sys.exit(1)
  print(json.dumps(summary))


if __name__ == "__main__":
  app.run(main)
