"""The thread that writes the last batches while the next forward runs (sae_jax.data.prefetch is the
one that prepares the next ones).

Both hand work over through bounded queues, so memory holds a few batches whatever the input size,
and an exception in either thread is raised again in the main thread.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable



_DONE = object()


class BackgroundWorker:
  """Runs `handle(item)` for each submitted item in order, in one background thread."""

  def __init__(self, handle: Callable[[object], None], depth: int):
    self._handle = handle
    self._queue: queue.Queue = queue.Queue(maxsize=depth)
    self._error: BaseException | None = None
    self._thread = threading.Thread(target=self._run, name="harvest-writer", daemon=True)
    self._thread.start()

  def _run(self):
    while (item := self._queue.get()) is not _DONE:
      if self._error is None:
        try:
          self._handle(item)
        except BaseException as e:
          self._error = e  # keep draining so that submit() never blocks on a dead worker

  def _raise_error(self):
    if self._error is not None:
      raise self._error

  def submit(self, item) -> None:
    self._raise_error()
    self._queue.put(item)

  def close(self, raise_error: bool = True) -> None:
    """Waits until every submitted item is handled, then raises the worker's first error."""
    self._queue.put(_DONE)
    self._thread.join()
    if raise_error:
      self._raise_error()
