"""`python -m sae_jax.store --store=PATH`: verify a store's checksums and print a JSON summary."""

import json
import sys

from absl import app, flags

from sae_jax.store import Store, StoreError

_STORE = flags.DEFINE_string("store", None, "Path of the activation store to verify.", required=True)
_ALLOW_INCOMPLETE = flags.DEFINE_bool(
    "allow_incomplete", False, "Summarise a store whose harvest has not finished yet.")


def main(argv):
  del argv
  try:
    store = Store(_STORE.value, verify=True, allow_incomplete=_ALLOW_INCOMPLETE.value)
  except StoreError as e:
    print(json.dumps({"ok": False, "error": str(e)}))
    sys.exit(1)
  print(json.dumps({"ok": True, **store.summary()}))


if __name__ == "__main__":
  app.run(main)
