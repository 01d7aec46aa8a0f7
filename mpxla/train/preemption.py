"""SIGTERM (preemption) as a flag the trainer polls, from process start to the last step.

`python -m mpxla.train` calls `install()` before anything else, so a SIGTERM during start-up,
restore or compilation is remembered rather than killing the process; the trainer then exits
cleanly before its first step, or saves the step it is at (docs/train.md).
"""

from __future__ import annotations

import contextlib
import signal
import threading

_state = {"requested": False}


class Stop:
  """`requested` is True once a SIGTERM arrived."""

  @property
  def requested(self) -> bool:
    return _state["requested"]


def _handler(signum, frame) -> None:
  del signum, frame
  _state["requested"] = True


def install() -> None:
  """Remembers SIGTERM from now on (the main thread of the process only)."""
  signal.signal(signal.SIGTERM, _handler)


@contextlib.contextmanager
def catch_sigterm():
  """Yields a Stop; SIGTERM sets it inside the block (outside a main thread it never does)."""
  if threading.current_thread() is not threading.main_thread():
    yield Stop()
    return
  previous = signal.getsignal(signal.SIGTERM)
  if previous is _handler:  # installed at start-up: keep what it saw
    yield Stop()
    return
  _state["requested"] = False
  signal.signal(signal.SIGTERM, _handler)
  try:
    yield Stop()
  finally:
    signal.signal(signal.SIGTERM, previous)
    _state["requested"] = False
