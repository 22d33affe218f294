"""How every command runs: absl parses the flags, then `main()`. A usage error (a stray argument,
app.UsageError) is one line on stderr, never the whole --help; an error in the user's input is the
one-line JSON summary `{"ok": false, "error": ...}`, never a traceback. Both exit 1."""

from __future__ import annotations

import json
import sys
from typing import Callable

from absl import app


def run(main: Callable[[], object] | dict[str, Callable[[], object]],
        user_errors: tuple[type[Exception], ...] = ()) -> None:
  """`main` is the program, or {subcommand: program} for `python -m X SUBCOMMAND --flags`."""
  def checked(argv: list[str]):
    try:
      if isinstance(main, dict):
        if len(argv) < 2 or argv[1] not in main:
          raise app.UsageError(f"name a subcommand first: one of {', '.join(main)}")
        program, argv = main[argv[1]], argv[1:]
      else:
        program = main
      if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {' '.join(argv[1:])}")
      return program()
    except app.UsageError as e:
      print(f"error: {e} (--help lists the flags)", file=sys.stderr)
      sys.exit(1)
    except user_errors as e:
      print(json.dumps({"ok": False, "error": str(e)}))
      sys.exit(1)

  app.run(checked)
