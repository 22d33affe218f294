"""`python -m harvest`: record activations of a LLaVA model into one store per layer."""

import json

from absl import flags

from harvest import flags as harvest_flags
from harvest.flags import apply_torch_threads, config_from_flags
from harvest.hooks import HookError
from harvest.images import InputError
from harvest.llava import ModelError
from harvest.run import HarvestError, harvest
from harvest.shards import ActivationError
from harvest.tokens import TokenError
from sae_jax import cli
from sae_jax.store import StoreError

# Errors that name their flag, file or image: printed as the JSON summary, without a traceback.
USER_ERRORS = (HarvestError, HookError, InputError, ModelError, ActivationError, TokenError,
               StoreError)
flags.adopt_module_key_flags(harvest_flags)  # --help lists them


def main():
  apply_torch_threads()
  print(json.dumps(harvest(config_from_flags())))


if __name__ == "__main__":
  cli.run(main, USER_ERRORS)
