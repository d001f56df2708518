"""Preemption: SIGTERM asks a training loop to save at its next step boundary and stop.

Schedulers (Kubernetes, SLURM, spot and preemptible VMs) send SIGTERM and wait a grace period
before SIGKILL. Dying at once would lose everything since the last periodic checkpoint; instead,
while a loop runs inside `watch()`, SIGTERM only sets a flag, the loop saves its state at the end
of the step it is in and raises `Preempted`, and the main job exits with `EXIT_CODE`. A rerun of
the same command resumes from that step. A second SIGTERM kills the process as usual.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

# 128 + SIGTERM, what a shell reports for a process SIGTERM ended: not 0, since the run is not
# finished and a scheduler should retry it, not mark it done.
EXIT_CODE = 128 + signal.SIGTERM


class Preempted(Exception):
  """Raised at a step boundary after SIGTERM, once the state is saved; rerunning resumes."""


_requested = threading.Event()
_depth = 0


def requested() -> bool:
  """Whether SIGTERM arrived since the outermost active `watch()` began."""
  return _requested.is_set()


def requested_anywhere() -> bool:
  """`requested()` on any process of a multi-process run (a collective: all must call it).

  A scheduler may signal one host before the others; all must stop at the same step, or the
  ones going on would wait forever for the ones that stopped.
  """
  import jax  # this module stays importable without jax for the signal logic alone

  if jax.process_count() == 1:
    return requested()
  import numpy as np
  from jax.experimental import multihost_utils

  flags = multihost_utils.process_allgather(np.asarray(requested(), np.int32))
  return bool(np.any(flags))


@contextlib.contextmanager
def watch() -> Iterator[None]:
  """While active, SIGTERM sets `requested()` instead of ending the process.

  Nested uses share the outermost handler. Signal handlers can only be installed from the main
  thread; elsewhere this does nothing and SIGTERM keeps its usual effect.
  """
  global _depth
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  if _depth:
    _depth += 1
    try:
      yield
    finally:
      _depth -= 1
    return
  previous = signal.getsignal(signal.SIGTERM)
  if previous is None:  # installed from outside Python: the closest is the default action
    previous = signal.SIG_DFL

  def handler(signum, frame):
    _requested.set()
    signal.signal(signal.SIGTERM, previous)  # a second SIGTERM is not ignored

  _requested.clear()
  signal.signal(signal.SIGTERM, handler)
  _depth += 1
  try:
    yield
  finally:
    _depth -= 1
    signal.signal(signal.SIGTERM, previous)
