"""The main job's stages, one module per registry entry (registry.py names them and their
outputs), each alike:

  run(ctx: stage_context.Context, out: registry.Outputs) -> summary
      computes from its own settings in the run's plan (`ctx.settings`, parsed once by
      run/plan.py), writing its outputs to `out.staged(name)` (published whole when it
      returns) and its resumable work to `out.work(name)`;
  check(plan: stage_context.Plan) -> list of problems   (where a stage has checks of its own)
      the stage's part of whole-run validation, one "setting: message" line per problem.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Callable

from minitron_jax.run import registry


# The functions here are not named after a stage: a stage's module, once imported, is an
# attribute of this package under its own name.


def module(name: str) -> ModuleType:
  """The module of the registered stage `name`."""
  if name not in registry.BY_NAME:
    raise KeyError(f"no stage {name!r}; registered: {list(registry.NAMES)}")
  return importlib.import_module(f"{__name__}.{name}")


def runner(name: str) -> Callable:
  return module(name).run


def problems(name: str, plan) -> list[str]:
  """The problems stage `name` finds in its own settings in `plan` ([] for a stage with no
  checks of its own)."""
  own = getattr(module(name), "check", None)
  return own(plan) if own is not None else []
