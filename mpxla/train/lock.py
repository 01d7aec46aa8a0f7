"""One trainer per workdir: WORKDIR/trainer.lock holds the host and pid of the trainer using it.

A second trainer is refused. A lock left by a trainer that died (its pid is gone on this
host) is taken over with a warning; a lock from another host is never taken over, since
its process cannot be checked from here (delete the file once that trainer is gone).
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import time
from collections.abc import Callable

LOCK_NAME = "trainer.lock"


class WorkdirLocked(RuntimeError):
  """Another trainer holds the workdir."""


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


class WorkdirLock:
  """`with WorkdirLock(workdir, warn):` holds workdir/trainer.lock for the block."""

  def __init__(self, workdir: pathlib.Path, warn: Callable[[str], None] = print):
    self.path = pathlib.Path(workdir) / LOCK_NAME
    self.warn = warn
    self.owner = {"host": socket.gethostname(), "pid": os.getpid()}

  def acquire(self) -> None:
    text = json.dumps({**self.owner, "since": time.strftime("%Y-%m-%d %H:%M:%S")})
    for _ in range(3):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        holder = self._holder()
        if holder is None:  # being written right now, or unreadable: look again
          time.sleep(0.2)
          holder = self._holder()
        if holder is not None and (holder.get("host") != self.owner["host"]
                                   or _alive(int(holder.get("pid", -1)))):
          raise WorkdirLocked(
              f"{self.path.parent} is in use by another trainer (host {holder.get('host')}, pid "
              f"{holder.get('pid')}, since {holder.get('since', '?')}). Wait for it to finish, "
              f"use another --workdir, or delete {self.path} if that trainer is gone.") from None
        why = "unreadable" if holder is None else f"pid {holder.get('pid')} is gone"
        self.warn(f"warning: taking over the stale lock {self.path} ({why}).")
        self.path.unlink(missing_ok=True)
        continue
      with os.fdopen(fd, "w") as f:
        f.write(text)
      return
    raise WorkdirLocked(f"could not take {self.path}: another trainer keeps taking it.")

  def _holder(self) -> dict | None:
    try:
      return json.loads(self.path.read_text())
    except (OSError, ValueError):
      return None

  def release(self) -> None:
    holder = self._holder() or {}
    if (holder.get("host"), holder.get("pid")) == (self.owner["host"], self.owner["pid"]):
      self.path.unlink(missing_ok=True)

  def __enter__(self) -> WorkdirLock:
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()
