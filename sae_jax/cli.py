"""How every command runs: absl parses the flags, then `main()`. A usage error (a stray argument,
app.UsageError) is one line on stderr, never the whole --help; an error in the user's input is the
one-line JSON summary `{"ok": false, "error": ...}`, never a traceback. Both exit 1."""

from __future__ import annotations

import json
import sys
from typing import Callable

from absl import app


def run(main: Callable[[], object], user_errors: tuple[type[Exception], ...] = ()) -> None:
  def checked(argv: list[str]):
    try:
      if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {' '.join(argv[1:])}")
      return main()
    except app.UsageError as e:
      print(f"error: {e} (--help lists the flags)", file=sys.stderr)
      sys.exit(1)
    except user_errors as e:
      print(json.dumps({"ok": False, "error": str(e)}))
      sys.exit(1)

  app.run(checked)
