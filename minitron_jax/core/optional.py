"""Packages only some parts of the library use, imported where they are used.

The model, the losses and the distillation step need jax, flax, optax, orbax and numpy alone; the
data pipeline (grain, tensorflow-datasets), the run layer (ml-collections), the harness (lm-eval)
and the GPU kernels (tokamax) each bring their own. `module` imports one of them at its point of
use, and a missing one is a single line (`MissingPackage`, a ConfigError) naming the package, the
requirement minitron-jax states for it and what needs it, not a traceback from deep inside.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import pathlib
import re
import sys
import tomllib
from types import ModuleType

from minitron_jax.errors import ConfigError

# Import name -> distribution name, where they differ.
DISTRIBUTIONS = {
    "tensorflow_datasets": "tensorflow-datasets",
    "ml_collections": "ml-collections",
    "lm_eval": "lm-eval",
    "array_record": "array-record",
    "tensorflow_metadata": "tensorflow-metadata",
    "tree": "dm-tree",
}
PYPROJECT = pathlib.Path(__file__).resolve().parents[2] / "pyproject.toml"


class MissingPackage(ConfigError):
  """An optional package a requested feature needs is not installed."""


def distribution(import_name: str) -> str:
  top = import_name.split(".")[0]
  return DISTRIBUTIONS.get(top, top)


def _normalised(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


@functools.cache
def _requirements() -> tuple[tuple[str, str | None], ...]:
  """(requirement, extra or None) as minitron-jax states them: from the installed metadata, or
  from pyproject.toml where the repo runs uninstalled (the GPU kit puts it on PYTHONPATH)."""
  try:
    found = []
    for line in importlib.metadata.requires("minitron-jax") or ():
      requirement, _, marker = line.partition(";")
      extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
      found.append((requirement.strip(), extra.group(1) if extra else None))
    return tuple(found)
  except importlib.metadata.PackageNotFoundError:
    pass
  if not PYPROJECT.is_file():
    return ()
  project = tomllib.loads(PYPROJECT.read_text())["project"]
  found = [(r, None) for r in project.get("dependencies", ())]
  for extra, requirements in project.get("optional-dependencies", {}).items():
    found += [(r, extra) for r in requirements]
  return tuple(found)


def install_hint(package: str) -> str:
  """How to get `package`: its requirement as minitron-jax states it, and which extra brings it."""
  wanted = _normalised(package)
  stated = [(r, extra) for r, extra in _requirements()
            if _normalised(re.split(r"[\s<>=!~\[;]", r, maxsplit=1)[0]) == wanted]
  main = [r for r, extra in stated if extra is None]
  if main:
    return f"pip install '{main[0]}' (a dependency of minitron-jax: `pip install -e .` brings it)"
  extras = sorted({extra for _, extra in stated})
  if extras:
    return (f"pip install '{stated[0][0]}' (the minitron-jax extra "
            f"{' or '.join(repr(e) for e in extras)} brings it)")
  return f"pip install {package}"


def missing_message(import_name: str, needed_for: str) -> str:
  package = distribution(import_name)
  return f"{needed_for} needs the package {package!r}, which is not installed: {install_hint(package)}"


def module(import_name: str, needed_for: str) -> ModuleType:
  """`import import_name`, or MissingPackage naming its package when it is not installed (a
  module missing inside an installed package is left as the ImportError it is)."""
  try:
    return importlib.import_module(import_name)
  except ModuleNotFoundError as e:
    if e.name != import_name.split(".")[0]:  # the package is there; a module of it is not
      raise
    raise MissingPackage(missing_message(e.name, needed_for)) from None


@contextlib.contextmanager
def exit_when_missing(needed_for: str):
  """For a command line's imports: a package that is not installed ends the program with one
  line on stderr and exit 2, not an import traceback."""
  try:
    yield
  except MissingPackage as e:
    sys.exit(_refuse(str(e)))
  except ModuleNotFoundError as e:
    if not e.name or e.name.split(".")[0] == "minitron_jax":
      raise
    sys.exit(_refuse(missing_message(e.name, needed_for)))


def _refuse(message: str) -> int:
  print(f"error: {message}", file=sys.stderr)
  return 2
