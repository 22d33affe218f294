"""`python -m sae_jax.store --store=PATH`: verify a store's checksums and print a JSON summary.

STORE is a folder or a gs:// or s3:// URL. `--copy_to=DEST` copies it instead, checking each file
as it copies it and writing the manifest last: down to a local folder (which numpy alone can read),
or up to a bucket (`--store=DIR --copy_to=gs://bucket/path`, one PUT per file). A rerun resumes.
"""

import json

from absl import flags

from sae_jax import cli
from sae_jax.store import Store, StoreError
from sae_jax.store.copy import copy_store

_STORE = flags.DEFINE_string("store", None, "Activation store to verify: a folder, gs://bucket/path "
                             "or s3://bucket/path.", required=True)
_ALLOW_INCOMPLETE = flags.DEFINE_bool(
    "allow_incomplete", False, "Summarise a store whose harvest has not finished yet.")
_COPY_TO = flags.DEFINE_string("copy_to", None, "Copy the store to this folder, gs:// or s3:// URL "
                               "(resumes: files already copied whole are skipped).")


def main():
  store = Store(_STORE.value, allow_incomplete=_ALLOW_INCOMPLETE.value)
  if _COPY_TO.value:
    copied = copy_store(store, _COPY_TO.value)  # checks each file as it copies it
    store = Store(_COPY_TO.value, allow_incomplete=_ALLOW_INCOMPLETE.value)
    print(json.dumps({"ok": True, **store.summary(), "copied_from": _STORE.value,
                      "bytes_copied": copied}))
    return
  store.verify()
  print(json.dumps({"ok": True, **store.summary()}))


if __name__ == "__main__":
  cli.run(main, (StoreError,))
