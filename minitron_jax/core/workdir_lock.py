"""One run per work directory: the run holds `WORKDIR/run.lock` from its first stage to its end.

Two runs on one workdir (a requeued job while the first still runs, a command started twice)
would both write the same checkpoints and outputs, and one would die midway inside orbax. The lock
file names its holder (host, pid, start time) and is created atomically (O_CREAT | O_EXCL), so of
two runs starting together exactly one gets it and the other is refused in one line naming it.

A run that ends in any way Python sees (done, an error, `Preempted`, Ctrl-C) or by SIGTERM outside
a training loop removes its lock. One killed outright (SIGKILL, a crashed host) leaves it: on the
same host a lock whose pid no longer runs is taken over with a warning; from another host we
cannot tell, and the message says which file to remove. In a multi-process run process 0 holds
the lock for all, and every process learns whether it got it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import pathlib
import signal
import socket
import threading
import time
import warnings
from typing import Iterator

from minitron_jax.core import distributed
from minitron_jax.errors import ConfigError

LOCK_NAME = "run.lock"
_USABLE = "allowed: a directory this user can create and write"


@dataclasses.dataclass(frozen=True)
class Holder:
  """The run a lock file names."""
  host: str
  pid: int
  started: str  # ISO 8601 with the UTC offset: a user reads it to tell whether that run is theirs

  @classmethod
  def this_process(cls) -> Holder:
    return cls(socket.gethostname(), os.getpid(),
               datetime.datetime.now().astimezone().isoformat(timespec="seconds"))

  def __str__(self) -> str:
    return f"pid {self.pid} on {self.host}, started {self.started}"

  def is_gone(self) -> bool:
    """Whether this holder's process has certainly ended (knowable only on its own host)."""
    if self.host != socket.gethostname():
      return False
    if self.pid == os.getpid():
      # Not a lock this process took (it would have released it): one left by an earlier
      # process given the same pid, as a restarted container's first process is.
      return True
    try:
      os.kill(self.pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
      return True
    except PermissionError:  # it exists, under another user
      return False
    return False


@dataclasses.dataclass(frozen=True)
class Lock:
  path: pathlib.Path
  holder: Holder

  def release(self) -> None:
    """Removes the lock file if it still names this run (it may have been removed by hand and
    taken by another run since)."""
    if _read(self.path)[0] == self.holder:
      self.path.unlink(missing_ok=True)


def acquire(workdir: str | os.PathLike) -> Lock:
  """Creates `workdir` if need be and takes its lock; ConfigError if that cannot be done or
  another live run holds it."""
  workdir = pathlib.Path(workdir)
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except FileExistsError:  # exist_ok covers directories only
    raise ConfigError(f"--workdir={workdir} is a file; {_USABLE}") from None
  except OSError as e:
    raise ConfigError(f"--workdir={workdir} cannot be created ({_reason(e)}); {_USABLE}") from None
  path = workdir / LOCK_NAME
  me = Holder.this_process()
  for _ in range(3):  # a stale lock that several runs take over at once: the losers look again
    try:
      _create(path, me)
      return Lock(path, me)
    except FileExistsError:
      pass
    except OSError as e:
      raise ConfigError(f"--workdir={workdir} cannot be written ({_reason(e)}); "
                        f"{_USABLE}") from None
    holder, text = _read(path)
    if text is None:
      continue  # its run ended between our two looks
    if holder is None:
      raise ConfigError(f"--workdir={workdir} is locked by {path}, which names no run "
                        f"({text[:60]!r}); allowed: one run per workdir (remove {path} if no run "
                        "uses it)")
    if not holder.is_gone():
      raise ConfigError(f"--workdir={workdir} is in use by another run ({holder}); allowed: one "
                        f"run per workdir (wait for it to end, or remove {path} if it is gone)")
    warnings.warn(f"took over {path} from {holder}: that process no longer runs")
    _remove_if_unchanged(path, text)
  raise ConfigError(f"--workdir={workdir}: other runs keep taking {path}; allowed: one run per "
                    "workdir")


@contextlib.contextmanager
def held(workdir: str | os.PathLike) -> Iterator[None]:
  """The run's hold on `workdir`, released when the block ends however it ends.

  A collective in a multi-process run: process 0 takes the lock and every process learns the
  outcome, so all start or all stop. SIGTERM arriving outside a training loop (whose own handler
  saves and stops, `preemption.watch`) releases the lock and then ends the process as before.
  """
  lock, refused = None, None
  if distributed.is_primary():
    try:
      lock = acquire(workdir)
    except ConfigError as e:
      refused = e
  if not distributed.primary_says(refused is None):
    raise refused or ConfigError(f"--workdir={workdir} could not be taken by process 0 (its "
                                 "error says why); allowed: a workdir no other run holds")
  try:
    with _released_on_sigterm(lock):
      yield
  finally:
    if lock is not None:
      lock.release()


@contextlib.contextmanager
def _released_on_sigterm(lock: Lock | None) -> Iterator[None]:
  # Only where SIGTERM would end the process: a handler of the caller's keeps it (the run may go
  # on), and signal handlers can only be installed from the main thread.
  if (lock is None or threading.current_thread() is not threading.main_thread()
      or signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)):
    yield
    return

  def handler(signum, frame):
    lock.release()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)  # ends the process, as SIGTERM did before

  signal.signal(signal.SIGTERM, handler)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _create(path: pathlib.Path, holder: Holder) -> None:
  """Creates the lock file naming `holder`; FileExistsError if it exists."""
  fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
  try:
    with os.fdopen(fd, "w") as f:
      f.write(json.dumps(dataclasses.asdict(holder)) + "\n")
      f.flush()
      os.fsync(f.fileno())
  except OSError:
    path.unlink(missing_ok=True)  # a lock naming nobody would refuse every later run
    raise


def _read(path: pathlib.Path, waits: int = 10) -> tuple[Holder | None, str | None]:
  """(holder, text) of a lock file; text None if there is none, holder None if it names nobody.

  A run writes its name just after creating the file: an empty file is given a moment.
  """
  for attempt in range(waits + 1):
    try:
      text = path.read_text()
    except FileNotFoundError:
      return None, None
    try:
      holder = Holder(**json.loads(text))
    except (ValueError, TypeError):
      if text.strip() or attempt == waits:
        return None, text
      time.sleep(0.1)
      continue
    # A hand-edited file may hold other types; its pid must not reach os.kill.
    named = isinstance(holder.host, str) and type(holder.pid) is int
    return (holder if named else None), text
  return None, text


def _remove_if_unchanged(path: pathlib.Path, text: str) -> None:
  """Removes the lock file if it still holds `text` (a stale lock this run is taking over).

  Renaming is atomic where read-then-delete is not: had another run already replaced the stale
  lock by its own, the moved file shows it, and is put back.
  """
  moved = path.with_name(f".{path.name}.{os.getpid()}.stale")
  try:
    os.rename(path, moved)
  except FileNotFoundError:
    return  # another run removed it first
  try:
    if moved.read_text() != text:
      os.link(moved, path)  # FileExistsError: a third run holds it now, and keeps it
  except OSError:
    pass
  moved.unlink(missing_ok=True)


def _reason(error: OSError) -> str:
  return f"{error.filename}: {error.strerror}" if error.filename else str(error)
