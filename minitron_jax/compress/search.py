"""The lightweight architecture search loop (Minitron §2.4, Figure 10): prune every candidate,
retrain each briefly, keep the best.

Rankings right after pruning are unreliable and settle after a few hundred steps, so the paper
retrains each candidate (search_space.py enumerates them) with distillation and keeps the one with
the lowest validation loss. This module does the bookkeeping: losses per step, rankings, their
correlation with the final ranking, an optional task score that ranks instead (search_score.py),
save/resume; the caller supplies the prune-and-retrain step as a callback.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Callable, Iterable, Mapping, Sequence

from minitron_jax.errors import ConfigError
# The space, its candidates and their counts: search_space.py; these names stay importable here.
from minitron_jax.compress.search_space import (AXES, CONSTRAINTS, MOE_AXES, PAPER_SPACES,  # noqa: F401
                                       Candidate, SearchSpace, _is_int, _mlp_cell, _size_cells,
                                       candidate_name, candidates_markdown, enumerate_candidates,
                                       paper_space_15b_to_4b, paper_space_15b_to_8b,
                                       pruned_config, pruned_memory_bytes,
                                       pruned_num_active_params, pruned_num_params,
                                       table20_window_space_15b_to_8b)


# -------------------------------------------------------------------------------- the search loop


def spearman(order: Sequence[str], reference: Sequence[str]) -> float:
  """Spearman's rho between two strict rankings of the same names (1.0 for fewer than 2)."""
  n = len(order)
  if n < 2:
    return 1.0
  position = {name: i for i, name in enumerate(reference)}
  squares = sum((i - position[name]) ** 2 for i, name in enumerate(order))
  return 1.0 - 6.0 * squares / (n * (n * n - 1))


def kendall(order: Sequence[str], reference: Sequence[str]) -> float:
  """Kendall's tau between two strict rankings of the same names (1.0 for fewer than 2)."""
  n = len(order)
  if n < 2:
    return 1.0
  reference_position = {name: i for i, name in enumerate(reference)}
  position = [reference_position[name] for name in order]
  concordant = sum(1 if position[i] < position[j] else -1
                   for i in range(n) for j in range(i + 1, n))
  return concordant / (n * (n - 1) / 2)


def check_eval_steps(eval_steps: Iterable[int], allow_zero: bool = False) -> tuple[int, ...]:
  """The step counts candidates are ranked at, sorted; one line for an empty or bad list.
  allow_zero: step 0 (the pruned model before any retraining) is a valid step."""
  steps = tuple(eval_steps)
  if not steps:
    raise ConfigError("search eval_steps is empty; allowed: one or more positive step counts")
  for step in steps:
    if not _is_int(step) or step < (0 if allow_zero else 1):
      raise ConfigError(f"search eval step {step!r} is invalid; allowed: positive integers")
  if len(set(steps)) != len(steps):
    raise ConfigError(f"search eval_steps={list(steps)} repeats a step")
  return tuple(sorted(steps))


def _losses_at(name: str, losses: Mapping, steps: tuple[int, ...]) -> dict[int, float]:
  """{step: loss} for exactly `steps` (keys may be strings, as after JSON)."""
  by_step = {int(step): float(loss) for step, loss in losses.items()}
  missing = [step for step in steps if step not in by_step]
  if missing:
    raise ConfigError(f"search candidate {name} has no loss at steps {missing}; "
                      f"needed: {list(steps)}")
  return {step: by_step[step] for step in steps}


@dataclasses.dataclass(frozen=True)
class SearchResult:
  """Validation losses of every candidate at every step count, and what they imply.

  Rankings are strict: lower loss first, NaN last, ties by name. Correlations compare each step's
  ranking with the final step's (so the final step's are 1.0). Step 0 is the pruned model before
  retraining. With `scores` (a task score per candidate after its last step, higher is better,
  named `score_name`, e.g. an lm-evaluation-harness accuracy) the best candidate is the one
  with the highest score instead of the lowest final loss.
  """

  candidates: tuple[Candidate, ...]
  eval_steps: tuple[int, ...]
  losses: dict[str, dict[int, float]]
  scores: dict[str, float] | None = None
  score_name: str = ""

  def __post_init__(self):
    candidates = tuple(self.candidates)
    if not candidates:
      raise ConfigError("a search result needs at least one candidate")
    names = [c.name for c in candidates]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
      raise ConfigError(f"search candidates {repeated} appear more than once")
    steps = check_eval_steps(self.eval_steps, allow_zero=True)
    if self.scores is not None:
      unscored = [n for n in names if n not in self.scores]
      if unscored:
        raise ConfigError(f"search scores are missing for candidates {unscored}")
      object.__setattr__(self, "scores", {n: float(self.scores[n]) for n in names})
    unknown = sorted(set(self.losses) - set(names))
    if unknown:
      raise ConfigError(f"search losses name unknown candidates {unknown}")
    missing = [n for n in names if n not in self.losses]
    if missing:
      raise ConfigError(f"search losses are missing for candidates {missing}")
    object.__setattr__(self, "candidates", candidates)
    object.__setattr__(self, "eval_steps", steps)
    object.__setattr__(self, "losses",
                       {n: _losses_at(n, self.losses[n], steps) for n in names})

  @property
  def final_step(self) -> int:
    return self.eval_steps[-1]

  def candidate(self, name: str) -> Candidate:
    for candidate in self.candidates:
      if candidate.name == name:
        return candidate
    raise ConfigError(f"search candidate {name!r} is unknown; known: "
                      f"{[c.name for c in self.candidates]}")

  @functools.cached_property
  def rankings(self) -> dict[int, tuple[str, ...]]:
    """step -> candidate names, best (lowest loss) first."""
    def key(step):
      return lambda n: (math.isnan(self.losses[n][step]), self.losses[n][step], n)
    return {step: tuple(sorted(self.losses, key=key(step))) for step in self.eval_steps}

  @functools.cached_property
  def ranks(self) -> dict[str, dict[int, int]]:
    """name -> step -> 1-based rank."""
    ranks: dict[str, dict[int, int]] = {n: {} for n in self.losses}
    for step, order in self.rankings.items():
      for i, name in enumerate(order):
        ranks[name][step] = i + 1
    return ranks

  @functools.cached_property
  def score_ranking(self) -> tuple[str, ...] | None:
    """Candidate names by score, best (highest) first, NaN last, ties by final loss then name."""
    if self.scores is None:
      return None
    final = self.final_step
    return tuple(sorted(self.scores, key=lambda n: (math.isnan(self.scores[n]), -self.scores[n],
                                                    self.losses[n][final], n)))

  @property
  def best(self) -> Candidate:
    """Highest score when scored, else lowest validation loss at the last step."""
    order = self.score_ranking or self.rankings[self.final_step]
    return self.candidate(order[0])

  @functools.cached_property
  def spearman(self) -> dict[int, float]:
    final = self.rankings[self.final_step]
    return {step: spearman(order, final) for step, order in self.rankings.items()}

  @functools.cached_property
  def kendall(self) -> dict[int, float]:
    final = self.rankings[self.final_step]
    return {step: kendall(order, final) for step, order in self.rankings.items()}

  def to_markdown(self) -> str:
    """A candidate table in final-rank order, then each step's rank correlation with the final."""
    steps = self.eval_steps
    header = (["name", "layers", "hidden", "heads", "groups", "MLP", "params", "active",
               "memory"] + [f"loss@{s}" for s in steps] + [f"rank@{s}" for s in steps])
    if self.scores is not None:
      header.append(self.score_name or "score")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in self.score_ranking or self.rankings[self.final_step]:
      candidate, target = self.candidate(name), self.candidate(name).target
      cells = [name, target["num_layers"], target["hidden_size"], target["num_attention_heads"],
               target["num_key_value_heads"], _mlp_cell(target, ratio=True)]
      cells += _size_cells(candidate)
      cells += [f"{self.losses[name][s]:.4f}" for s in steps]
      cells += [self.ranks[name][s] for s in steps]
      if self.scores is not None:
        cells.append(f"{self.scores[name]:.4f}")
      lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines.append("")
    best = self.best
    by_score = "" if self.scores is None else (
        f"{self.score_name or 'score'} {self.scores[best.name]:.4f} (ranked by it), ")
    lines.append(f"Best: {best.name} ({best.num_params:,} parameters), {by_score}validation "
                 f"loss {self.losses[best.name][self.final_step]:.4f} at step {self.final_step}.")
    lines.append("")
    lines.append(f"Rank correlation with the final ranking (step {self.final_step}):")
    lines.append("")
    for step in steps:
      lines.append(f"- step {step}: Spearman ρ = {self.spearman[step]:+.3f}, "
                   f"Kendall τ = {self.kendall[step]:+.3f}")
    return "\n".join(lines) + "\n"

  def to_json(self, indent: int | None = 2) -> str:
    """Everything, derived values included for readers; `from_json` recomputes them."""
    return json.dumps(dict(
        eval_steps=list(self.eval_steps),
        candidates=[c.to_dict() for c in self.candidates],
        losses={n: {str(s): v for s, v in losses.items()} for n, losses in self.losses.items()},
        scores=self.scores, score_name=self.score_name,
        best=self.best.name,
        rankings={str(s): list(order) for s, order in self.rankings.items()},
        spearman={str(s): v for s, v in self.spearman.items()},
        kendall={str(s): v for s, v in self.kendall.items()},
    ), indent=indent)

  @classmethod
  def from_json(cls, text: str) -> "SearchResult":
    try:
      fields = json.loads(text)
      return cls(candidates=tuple(Candidate.from_dict(c) for c in fields["candidates"]),
                 eval_steps=tuple(int(s) for s in fields["eval_steps"]),
                 losses=fields["losses"], scores=fields.get("scores"),
                 score_name=fields.get("score_name", ""))
    except (ValueError, KeyError, TypeError) as error:
      if isinstance(error, ConfigError):
        raise
      raise ConfigError(f"search result JSON is malformed: {error!r}") from None


def run_search(candidates: Sequence[Candidate],
               evaluate_fn: Callable[[Candidate], Mapping[int, float] | tuple],
               eval_steps: Iterable[int], *,
               done: Mapping[str, Mapping] | None = None,
               on_result: Callable[[Candidate, dict], None] | None = None,
               log: Callable[[str], None] | None = None,
               score_name: str | None = None) -> SearchResult:
  """Calls `evaluate_fn(candidate)` for each candidate not in `done`: it returns {step: validation
  loss}, or with `score_name` ({step: loss}, score) (higher is better; the ranking follows it).

  `done` holds finished evaluations by candidate name, as `on_result` saw them ({step: loss}, or
  {"losses": ..., "score": ...} when scored); entries lacking a step of `eval_steps` or a score
  are evaluated again and entries for names not among `candidates` are ignored. `on_result` sees
  each new evaluation (to save progress).
  """
  steps = check_eval_steps(eval_steps, allow_zero=True)
  candidates = tuple(candidates)
  log = log or (lambda message: None)
  names = {c.name for c in candidates}
  losses: dict[str, dict[int, float]] = {}
  scores: dict[str, float] = {}
  for name, previous in (done or {}).items():
    if name not in names:
      log(f"[search] ignoring saved losses of {name}: not a candidate of this search")
      continue
    try:
      scored = "losses" in previous
      if score_name is not None and not scored:
        raise ConfigError(f"no {score_name} saved")
      losses[name] = _losses_at(name, previous["losses"] if scored else previous, steps)
      if score_name is not None:
        scores[name] = float(previous["score"])
    except ConfigError as error:
      losses.pop(name, None)
      log(f"[search] evaluating {name} again: {error}")
  todo = [c for c in candidates if c.name not in losses]
  if len(todo) < len(candidates):
    log(f"[search] {len(candidates) - len(todo)} of {len(candidates)} candidates already done")
  for index, candidate in enumerate(todo):
    outcome = evaluate_fn(candidate)
    name = candidate.name
    if score_name is not None:
      outcome, scores[name] = outcome[0], float(outcome[1])
    losses[name] = _losses_at(name, outcome, steps)
    scored = "" if score_name is None else f", {score_name} {scores[name]:.4f}"
    log(f"[search] {index + 1}/{len(todo)} {name}: loss {losses[name][steps[-1]]:.4f} at step "
        f"{steps[-1]}{scored}")
    if on_result is not None:
      record = dict(losses[name])
      on_result(candidate, record if score_name is None
                else dict(losses=record, score=scores[name]))
  return SearchResult(candidates=candidates, eval_steps=steps, losses=losses,
                      scores=None if score_name is None else scores,
                      score_name=score_name or "")
