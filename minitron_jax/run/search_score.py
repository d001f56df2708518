"""Ranking search candidates by a task's score instead of their validation loss (`search.score`).

Model Optimizer's search ranks candidates by a `score_func` such as MMLU accuracy, computed on each
pruned candidate without retraining; the Minitron paper retrains each briefly and compares losses.
Both are settings here:
  search.score     ""                          rank by validation loss after retraining (default)
                   "lm_eval:TASK[/METRIC]"     rank by an lm-evaluation-harness score, higher is
                                               better; TASK is a harness task or group, or one of
                                               `evaluate.tasks` (then written as a harness task);
                                               METRIC defaults to acc
  search.score_at  "retrained"                 after each candidate's short retraining
                   "pruned"                    on the pruned candidate, with no retraining (its
                                               zero-shot validation loss is kept as step 0)
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable

from minitron_jax.evaluation import lm_eval_tasks
from minitron_jax.run import task_config
from minitron_jax.models.config import ModelConfig
from minitron_jax.errors import ConfigError

PREFIX = "lm_eval:"
WHEN = ("retrained", "pruned")


@dataclasses.dataclass(frozen=True)
class TaskScore:
  task: str
  metric: str = "acc"
  before_retraining: bool = False

  @property
  def name(self) -> str:
    return f"lm_eval {self.task}/{self.metric}"

  @property
  def slug(self) -> str:
    return f"{self.task}.{self.metric}".replace("/", "_")


def parse(text: str = "", when: str = "retrained") -> TaskScore | None:
  """The search's score setting (`search.score`, `search.score_at`); None ranks by validation
  loss."""
  if when not in WHEN:
    raise ConfigError(f"search.score_at={when!r} is not supported; allowed: {WHEN}")
  if not text:
    if when != "retrained":
      raise ConfigError(f"search.score_at={when!r} needs a search.score; allowed without one: "
                        "'retrained'")
    return None
  if not isinstance(text, str) or not text.startswith(PREFIX) or not text[len(PREFIX):].strip():
    raise ConfigError(f"search.score={text!r} is not supported; allowed: '' (validation loss) or "
                      "'lm_eval:TASK[/METRIC]'")
  task, _, metric = text[len(PREFIX):].strip().partition("/")
  return TaskScore(task.strip(), metric.strip() or "acc", before_retraining=when == "pruned")


def check(score: TaskScore | None, scoring: task_config.EvaluateSettings, *,
          index: bool = True) -> list[str]:
  """One line per problem of the score's task (none without a score); `index` also looks a
  harness task up."""
  if score is None:
    return []
  if score.task in scoring.tasks:
    return [f"search.score: {p}" for p in task_config.check_tasks(
        {score.task: scoring.tasks[score.task]})]
  if index:
    try:
      lm_eval_tasks.task_manager(scoring.lm_eval.include_path or None, [score.task])
    except ConfigError as e:
      return [f"search.score: {e}; or name one of evaluate.tasks {sorted(scoring.tasks)}"]
  return []


def scorer(score: TaskScore, scoring: task_config.EvaluateSettings,
           tasks_directory: pathlib.Path, mesh) -> Callable[[ModelConfig, object, object], float]:
  """score(config, params, tokenizer) -> the task score of one model, on the mesh. An
  `evaluate.tasks` entry is written as a harness task into `tasks_directory` first."""
  own = (task_config.load_tasks({score.task: scoring.tasks[score.task]})
         if score.task in scoring.tasks else {})
  manager = task_config.harness_index(scoring.lm_eval, [] if own else [score.task], own,
                                      tasks_directory)

  def score_of(config: ModelConfig, params, tokenizer) -> float:
    scores = lm_eval_tasks.evaluate(
        config, params, tokenizer, [score.task], num_fewshot=scoring.lm_eval.num_fewshot,
        limit=task_config.limit_of(scoring.lm_eval.limit), batch_size=scoring.batch_size,
        max_length=scoring.max_length, mesh=mesh, manager=manager)
    key = f"{score.task}/{score.metric}"
    if key not in scores:
      raise ConfigError(f"search.score: task {score.task!r} reports {sorted(scores)}, not {key!r}")
    return scores[key]

  return score_of
