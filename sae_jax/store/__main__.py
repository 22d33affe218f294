"""`python -m sae_jax.store --store=PATH`: verify a store's checksums and print a JSON summary."""

import json

from absl import flags

from sae_jax import cli
from sae_jax.store import Store, StoreError

_STORE = flags.DEFINE_string("store", None, "Path of the activation store to verify.", required=True)
_ALLOW_INCOMPLETE = flags.DEFINE_bool(
    "allow_incomplete", False, "Summarise a store whose harvest has not finished yet.")


def main():
  store = Store(_STORE.value, verify=True, allow_incomplete=_ALLOW_INCOMPLETE.value)
  print(json.dumps({"ok": True, **store.summary()}))


if __name__ == "__main__":
  cli.run(main, (StoreError,))
