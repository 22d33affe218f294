"""Keeps the libraries' INFO chatter (orbax logs every file it closes) out of our commands' logs."""

import logging as py_logging

from absl import logging

_CHATTY = ("orbax", "grain")


def quiet_libraries() -> None:
  def keep(record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.WARNING or not any(
        name in record.pathname for name in _CHATTY)

  logging.get_absl_handler().addFilter(keep)
