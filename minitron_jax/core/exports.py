"""A subpackage's entry points, each imported from its own module when first used (PEP 562), so
importing the package costs nothing and pulls in no optional package (grain, lm-eval,
ml-collections) until an entry point that needs it is reached.

  __getattr__, __dir__, __all__ = exports.lazy(__name__, {"importance": ("estimate", ...)})

An entry point keeps its own name, and no name is also a module's (`compress.prune` stays the
module; its `prune` function is `compress.prune.prune`).
"""

from __future__ import annotations

import importlib
from typing import Callable, Mapping


def lazy(package: str, entry_points: Mapping[str, tuple[str, ...]]
         ) -> tuple[Callable[[str], object], Callable[[], list[str]], list[str]]:
  """(__getattr__, __dir__, __all__) of `package`, whose `entry_points` maps each module (below
  the package) to the names it defines that the package exports."""
  where = {name: module for module, names in entry_points.items() for name in names}
  clashes = sorted(set(where) & set(entry_points))
  assert not clashes, f"{package}: entry points {clashes} are also module names"

  def __getattr__(name: str):
    if name not in where:
      raise AttributeError(f"module {package!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{package}.{where[name]}"), name)

  def __dir__() -> list[str]:
    return sorted(set(where) | set(entry_points))

  return __getattr__, __dir__, sorted(where)
