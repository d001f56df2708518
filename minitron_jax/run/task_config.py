"""The evaluation settings (`EvaluateSettings`: the `evaluate` section, typed) and our
multiple-choice tasks (`evaluate.tasks`): each entry's loader and its checks, and the tasks
written as lm-evaluation-harness tasks. The evaluate stage and the search (which can rank
candidates by a task's score) both read them here."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import pathlib
from typing import Any, Mapping

from minitron_jax.core import atomic
from minitron_jax.evaluation import lm_eval_tasks, mc_tasks, stdlib_tasks
from minitron_jax.errors import ConfigError


STDLIB_TASK = "stdlib_next_line"


@dataclasses.dataclass(frozen=True)
class HarnessSettings:
  """`evaluate.lm_eval`: harness tasks and our own (comma-separated names), extra task YAMLs,
  shots (None: each task's own) and examples per task (0 every one, a count, or a fraction)."""

  tasks: str = ""
  own_tasks: str = ""
  include_path: str = ""
  num_fewshot: int | None = None
  limit: float = 0.0


@dataclasses.dataclass(frozen=True)
class EvaluateSettings:
  """`evaluate`: our tasks (name -> source and loader arguments), the scoring batch and length,
  the harness, and the prompts every model completes greedily."""

  tasks: Mapping[str, Mapping[str, Any]]
  batch_size: int
  max_length: int
  lm_eval: HarnessSettings
  prompts: Any  # a tuple of strings (checked by the evaluate stage)
  max_new_tokens: int


def _task_loader(spec: Mapping[str, Any]):
  """(loader, its argument check, the arguments it takes, a ConfigError for those it does not
  or None) of one `evaluate.tasks` entry. The loader itself would fail on an unknown argument
  with a TypeError, so they are found here."""
  spec = dict(spec)
  source = spec.pop("source", None)
  if not source:
    raise ConfigError(f"source={source!r} is missing; allowed: {STDLIB_TASK!r}, a JSONL file or "
                      "tfds:NAME")
  if source == STDLIB_TASK:
    loader, check = stdlib_tasks.next_line_task, stdlib_tasks.check_arguments
  else:
    loader = functools.partial(mc_tasks.load_task, source)
    check = functools.partial(mc_tasks.check_task, source)
  allowed = [name for name, parameter in inspect.signature(loader).parameters.items()
             if parameter.kind is not inspect.Parameter.VAR_KEYWORD]
  unknown = sorted(set(spec) - set(allowed))
  refused = None if not unknown else ConfigError(
      f"arguments {unknown} do not apply to source={source!r}; allowed: {['source'] + allowed}")
  return loader, check, {k: v for k, v in spec.items() if k in allowed}, refused


def check_tasks(tasks: Mapping[str, Mapping[str, Any]]) -> list[str]:
  """One line per task that `load_tasks` would refuse (all its problems), reading no example."""
  problems = []
  for name, spec in tasks.items():
    found = []
    try:
      _, check, arguments, refused = _task_loader(spec)
      if refused is not None:
        found.append(str(refused))
      check(**arguments)
    except ConfigError as e:
      found.insert(0, str(e))  # the source itself first: it decides which arguments apply
    if found:
      problems.append(f"evaluate.tasks.{name}: " + "; also ".join(found))
  return problems


def load_tasks(specs: Mapping[str, Mapping[str, Any]]) -> dict[str, list]:
  """name -> examples, from `evaluate.tasks` (the embedded stdlib task or local/TFDS files)."""
  tasks = {}
  for name, spec in specs.items():
    loader, _, arguments, refused = _task_loader(spec)
    if refused is not None:
      raise refused
    tasks[name] = loader(**arguments)
  return tasks


def limit_of(value) -> int | float | None:
  """The harness's limit: None for 0 (every example), a count from 1 up, a fraction below."""
  return None if not value else (int(value) if value >= 1 else float(value))


def write_harness_tasks(tasks: Mapping[str, list], directory: pathlib.Path) -> pathlib.Path:
  """Each task as a local harness task (name.yaml + name.jsonl) in `directory`, replaced whole."""
  with atomic.directory(directory) as staging:
    for name, examples in tasks.items():
      # The data path inside the YAML must be where the files end up, not the staging copy.
      lm_eval_tasks.write_task(name, examples, staging, data_directory=directory)
  return directory


def harness_index(harness: HarnessSettings, names: list[str], own: Mapping[str, list],
                  tasks_directory: pathlib.Path):
  """The harness's task index for `names` (harness tasks) and `own` (our tasks, written as
  harness tasks into `tasks_directory` first), with `evaluate.lm_eval.include_path`."""
  include = [harness.include_path] if harness.include_path else []
  if own:
    include.insert(0, str(write_harness_tasks(own, tasks_directory)))
  return lm_eval_tasks.task_manager(include or None, [*names, *own])
