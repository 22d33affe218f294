"""A generator run ahead of its consumer in a background thread, through a bounded queue."""

from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator

_DONE = object()


def prefetch(items: Iterable, depth: int, name: str = "prefetch") -> Iterator:
  """Yields `items`, produced up to `depth` ahead (plus the one being produced) in a background
  thread; an exception there is raised here. Closing the consumer stops the producer."""
  q: queue.Queue = queue.Queue(maxsize=depth)
  stop = threading.Event()

  def put(item) -> bool:
    while not stop.is_set():
      try:
        q.put(item, timeout=0.1)
        return True
      except queue.Full:
        pass
    return False

  def produce():
    try:
      for item in items:
        if not put(item):
          return
      put(_DONE)
    except BaseException as e:  # handed to the consumer, which raises it
      put(e)

  thread = threading.Thread(target=produce, name=name, daemon=True)
  thread.start()
  try:
    while (item := q.get()) is not _DONE:
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()  # the consumer stopped (done or failed): let the producer end
    thread.join()
