"""Keeps the libraries' chatter out of our commands' logs: orbax's INFO lines (it logs every
file it closes), and, off a TPU host, libtpu's start-up warnings and lockfile."""

import glob
import logging as py_logging
import os

from absl import logging
import jax

# Python modules whose INFO lines are dropped; xla_bridge says at INFO that a backend (the TPU's,
# where libtpu is installed but no TPU is attached) could not start.
_CHATTY = ("orbax", "xla_bridge.py")


def quiet_libraries() -> None:
  quiet_tpu_runtime()

  def keep(record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.WARNING or not any(
        name in record.pathname for name in _CHATTY)

  logging.get_absl_handler().addFilter(keep)


def quiet_tpu_runtime() -> None:
  """Off a TPU host, libtpu (the tpu extra) still loads when JAX starts its backends, and without
  the TPU VM's metadata it writes a screen of warnings about unknown hostnames and accelerator
  type. Naming this host and some type silences them; it changes no compile for a
  `--aot_topology` (the HLO of a v5e and a v4 plan came out identical). Must run before JAX starts
  its backends; on a TPU host (a /dev/accel* or /dev/vfio device) it does nothing.

  It also lets several processes load libtpu at once: its lockfile (/tmp/libtpu_lockfile) guards
  a TPU this host does not have, and a compile failed while another JAX process held it."""
  if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
    return
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-1")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def note(text: str) -> None:
  """A line for the user in the log, from process 0 only."""
  if jax.process_index() == 0:
    logging.info("NOTE: %s", text)
