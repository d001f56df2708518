"""lm-evaluation-harness tasks run on a model in memory, and our own tasks written as harness tasks.

The evaluate stage and the search score models with the harness's tasks (MMLU, HellaSwag, ARC,
local YAMLs under an include path) through our backend (lm_eval_backend.MinitronLM), on the run's
mesh. Our multiple-choice tasks (the embedded stdlib next-line task, JSONL files) can be written
as harness tasks too (`write_task`): the harness then scores exactly what our evaluator scores,
so its accuracy equals ours, which the embedded default's runlocal shows in its report.

An example without `continuation` becomes a harness multiple-choice document (context, choices,
gold index); one with a `continuation` (Winogrande's partial scoring) a multiple-input document,
whose choices are the contexts `context + choice_j` and whose target is the continuation. The
harness's target delimiter is empty (our choices carry their own).
"""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from minitron_jax.core import atomic
from minitron_jax.models.config import ModelConfig
from minitron_jax.errors import ConfigError
from minitron_jax.evaluation.mc_tasks import MultipleChoiceExample

# A harness task name may hold letters, digits, '_' and '-' (it names files and YAML keys too).
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
# Harness result keys are "metric,filter"; these are bookkeeping, not scores.
_NOT_SCORES = ("alias", "samples", "name", "sample_len", "sample_count")


def split_names(text: str | Sequence[str], setting: str) -> list[str]:
  """Comma-separated names (or a sequence of them), blanks dropped; one line for a bad name."""
  parts = text.split(",") if isinstance(text, str) else list(text)
  if not all(isinstance(part, str) for part in parts):
    raise ConfigError(f"{setting}={text!r} must be comma-separated names")
  names = [part.strip() for part in parts if part.strip()]
  if len(set(names)) != len(names):
    raise ConfigError(f"{setting}={text!r} repeats a name")
  return names


def write_task(name: str, examples: Sequence[MultipleChoiceExample],
               directory: str | pathlib.Path,
               data_directory: str | pathlib.Path | None = None) -> pathlib.Path:
  """`directory/name.jsonl` and `directory/name.yaml`: the examples as a local harness task named
  `name`; returns the YAML's path. The YAML names the JSONL in `data_directory` (default
  `directory`: the harness resolves a relative path against its working directory, so the path
  is absolute; pass the final directory when writing into a staging copy)."""
  if not _NAME.match(name):
    raise ConfigError(f"task name {name!r} cannot name a harness task; allowed: a letter, then "
                      "letters, digits, '_' or '-'")
  if not examples:
    raise ConfigError(f"task {name!r} has no examples")
  partial = {e.continuation is not None for e in examples}
  if len(partial) > 1:
    raise ConfigError(f"task {name!r} mixes examples with and without a continuation; the "
                      "harness scores one kind per task")
  directory = pathlib.Path(directory)
  data = directory / f"{name}.jsonl"
  named = pathlib.Path(data_directory or directory).absolute() / data.name
  if partial == {True}:
    records = [dict(label=e.gold, contexts=[context for context, _ in e.pairs()],
                    continuation=e.continuation) for e in examples]
    # doc_to_text naming an int field makes the harness score one request per context.
    fields = dict(doc_to_text="label", doc_to_choice="contexts", doc_to_target="continuation")
    metrics = ["acc"]  # the harness normalises multiple-input lengths by the contexts'
  else:
    records = [dict(context=e.context, choices=list(e.choices), gold=e.gold) for e in examples]
    fields = dict(doc_to_text="context", doc_to_choice="choices", doc_to_target="gold")
    metrics = ["acc", "acc_bytes"]  # acc_bytes is our acc_norm (log-likelihood per byte)
  atomic.write_text(data, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
  # JSON is YAML, so the task file needs no YAML writer.
  spec = dict(task=name, dataset_path="json", dataset_kwargs=dict(data_files=dict(test=str(named))),
              test_split="test", output_type="multiple_choice", target_delimiter="",
              **fields, metric_list=[dict(metric=m, aggregation="mean", higher_is_better=True)
                                     for m in metrics])
  path = directory / f"{name}.yaml"
  atomic.write_text(path, json.dumps(spec, indent=2) + "\n")
  return path


def task_manager(include_path: str | pathlib.Path | Sequence[str | pathlib.Path] | None,
                 names: Sequence[str], *, include_setting: str = "evaluate.lm_eval.include_path"):
  """The harness's task index: only the YAMLs under include_path (a directory or several) when
  every name is one of them (a second, against some 13 s for indexing the harness's 14k built-in
  tasks), else all. One line naming any name it lacks (and `include_setting`, where to add
  one)."""
  from lm_eval.tasks import TaskManager

  if isinstance(include_path, (str, pathlib.Path)):
    include_path = [include_path]
  include_path = [str(path) for path in include_path or ()] or None
  if include_path is not None:
    local = TaskManager(include_path=include_path, include_defaults=False)
    if all(name in local.all_tasks for name in names):
      return local
  manager = TaskManager(include_path=include_path)
  unknown = [name for name in names if name not in manager.all_tasks]
  if unknown:
    raise ConfigError(f"unknown lm-eval task(s) {unknown}; see `lm_eval ls tasks`, or put their "
                      f"YAML under {include_setting}")
  return manager


def flat_scores(results: Mapping[str, Any]) -> dict[str, float]:
  """{"task/metric": value} of a simple_evaluate result ("acc,none" -> "acc"; a filter other than
  none is kept: "exact_match,strict-match" -> "exact_match_strict-match"); standard errors out."""
  scores = {}
  for task, metrics in results["results"].items():
    for key, value in metrics.items():
      metric, _, filter_name = key.partition(",")
      if metric in _NOT_SCORES or metric.endswith("_stderr") or not isinstance(value, (int, float)):
        continue
      name = metric if filter_name in ("", "none") else f"{metric}_{filter_name}"
      scores[f"{task}/{name}"] = float(value)
  return scores


def evaluate(config: ModelConfig, params, tokenizer, tasks: Sequence[str], *,
             include_path: str | pathlib.Path | None = None, num_fewshot: int | None = None,
             limit: int | float | None = None, batch_size: int = 16,
             max_length: int | None = None, mesh: jax.sharding.Mesh | None = None,
             seed: int = 0, manager=None, log: Callable[[str], None] | None = None
             ) -> dict[str, float]:
  """The harness's scores of one model, {"task/metric": value}. `manager` reuses a task index
  across models (building one reads every YAML)."""
  import lm_eval

  from minitron_jax.evaluation.lm_eval_backend import MinitronLM

  backend = MinitronLM(config=config, params=params, tokenizer=tokenizer, batch_size=batch_size,
                       max_length=max_length, mesh=mesh, seed=seed)
  manager = manager or task_manager(include_path, tasks)
  results = lm_eval.simple_evaluate(
      model=backend, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
      task_manager=manager, bootstrap_iters=0, log_samples=False, verbosity="ERROR",
      random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
      fewshot_random_seed=seed)
  scores = flat_scores(results)
  if log is not None:
    log("[lm_eval] " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
  return scores
