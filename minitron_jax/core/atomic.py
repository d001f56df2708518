"""Outputs that appear whole or not at all: a kill at any moment leaves the old output or the new.

A stage marks itself done by a file (`prune/summary.json`), and a rerun trusts whatever is there,
so nothing may ever be seen half-written. Files are written beside their destination and renamed
over it (a rename within one file system is atomic); directories are built in a hidden sibling and
renamed into place.

In a multi-process run the work directory is shared: files are written by the primary process
only, and a directory is staged under one name every process uses (orbax writes each process's
shards into it), then renamed by the primary once all have finished.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
from typing import Any, Iterator

from minitron_jax.core import distributed


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Writes `data` atomically (on the primary process; the others write nothing)."""
  if not distributed.is_primary():
    return
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp")
  with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())  # the rename must never land before the data it names
  os.replace(tmp, path)


def write_text(path: str | os.PathLike, text: str) -> None:
  """Writes `text` atomically (on the primary process; the others write nothing)."""
  write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, value: Any) -> None:
  """Writes JSON atomically: a crash leaves the old file or the new one, never half of one."""
  write_text(path, json.dumps(value, indent=2))


def _backup(path: pathlib.Path) -> pathlib.Path:
  return path.with_name(f".{path.name}.old")


def recover(path: str | os.PathLike) -> None:
  """Puts back the old output if a swap in `directory` was killed between its two renames."""
  path = pathlib.Path(path)
  backup = _backup(path)
  if backup.exists() and not path.exists():
    os.replace(backup, path)
  elif backup.exists():
    shutil.rmtree(backup, ignore_errors=True)


@contextlib.contextmanager
def directory(path: str | os.PathLike, collective: bool = True) -> Iterator[pathlib.Path]:
  """Yields an empty staging directory; on success it replaces `path` (and what was there).

  On an exception the staging directory is removed and `path` is left as it was. Staging
  directories that a killed process left behind are removed on the next write of `path`.
  collective: every process enters (and gets the same staging directory); False when only the
  primary process calls this.
  """
  path = pathlib.Path(path).absolute()
  staging = path.with_name(f".{path.name}.tmp-staging")
  sync = distributed.barrier if collective else (lambda name: None)
  primary = distributed.is_primary()
  if primary:
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
      shutil.rmtree(stale, ignore_errors=True)
    staging.mkdir(mode=0o755)
  sync(f"staged {path}")
  try:
    yield staging
    sync(f"written {path}")
    if primary:
      _swap_in(staging, path)
    sync(f"renamed {path}")
  except BaseException:
    if primary:
      shutil.rmtree(staging, ignore_errors=True)
    raise


def _swap_in(new: pathlib.Path, path: pathlib.Path) -> None:
  """Renames `new` over `path`. A file goes in one rename; a directory in two (the old one is
  moved aside first): a kill between them leaves the old output at the backup name, which
  `recover` (run by the next write, and by readers that care) moves back."""
  recover(path)
  if path.exists() and (path.is_dir() or new.is_dir()):
    backup = _backup(path)
    os.replace(path, backup)
    os.replace(new, path)
    if backup.is_dir():
      shutil.rmtree(backup)
    else:
      backup.unlink()
  else:
    os.replace(new, path)


def _remove(path: pathlib.Path) -> None:
  recover(path)
  if path.is_dir():
    shutil.rmtree(path)
  elif path.exists():
    path.unlink()


@contextlib.contextmanager
def publish(directory: str | os.PathLike, names: tuple[str, ...],
            label: str = "outputs") -> Iterator[pathlib.Path]:
  """Yields an empty staging directory for the entries `names` of `directory`, which may hold
  other things (a stage's resumable work) that stay as they are.

  When the block ends without an error, each name the staging directory holds replaces its
  namesake in `directory` (whole: a file or directory appears complete or not at all), each name
  it does not hold is removed from `directory` (no output of an earlier run is left beside this
  run's), in the order of `names`: the last one (a done marker) is never seen before the others.
  An entry not in `names` is an error. Every process enters and gets the same staging directory;
  the primary renames once all have written.
  """
  directory = pathlib.Path(directory).absolute()
  staging = directory / f".{label}.tmp-staging"
  primary = distributed.is_primary()
  if primary:
    directory.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(staging, ignore_errors=True)  # left by a killed run
    staging.mkdir(mode=0o755)
  distributed.barrier(f"staged {staging}")
  try:
    yield staging
    distributed.barrier(f"written {staging}")
    if primary:
      unexpected = sorted(entry.name for entry in staging.iterdir() if entry.name not in names)
      if unexpected:
        raise RuntimeError(f"{label} wrote {unexpected}, which are not among its outputs {names}")
      for name in names:
        if (staging / name).exists():
          _swap_in(staging / name, directory / name)
        else:
          _remove(directory / name)
      staging.rmdir()
    distributed.barrier(f"published {staging}")
  except BaseException:
    if primary:
      shutil.rmtree(staging, ignore_errors=True)
    raise
