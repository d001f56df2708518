"""Lightweight architecture search (Minitron §2.4, Table 13, Figure 10): which pruned shape?

Pruning to a parameter budget has many answers (fewer layers, narrower embedding, fewer heads, a
smaller MLP). The paper enumerates every shape in a small grid of common sizes whose exact
parameter count lies within a tolerance of the budget, prunes each, retrains each briefly with
distillation and keeps the one with the lowest validation loss, because rankings right after
pruning are unreliable and settle after a few hundred steps. This module does the enumeration
(exact counts from `ModelConfig.num_params`, feasibility from `prune.validate_target`) and the
bookkeeping of the search loop (losses per step, rankings, their correlation with the final
ranking, save/resume); the caller supplies the prune-and-retrain step as a callback.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
from fractions import Fraction
from typing import Any, Callable, Iterable, Mapping, Sequence

from minitron_jax import prune
from minitron_jax.config import ConfigError, ModelConfig

AXES = ("num_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
        "intermediate_size")


def _exact(number: float | int) -> Fraction:
  """The decimal the user wrote (0.05 is 1/20, not the nearest binary double)."""
  return Fraction(number) if isinstance(number, int) else Fraction(repr(float(number)))


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class SearchSpace:
  """Candidate sizes per axis, and the parameter budget they must meet.

  An empty tuple for an axis keeps the source model's value. The MLP is given either as absolute
  `intermediate_size` values or as `mlp_expansion` factors of each candidate's hidden size; a
  factor's width is factor × hidden rounded to the nearest multiple of `round_to` (halves round
  up, never below `round_to`). A candidate qualifies when its exact parameter count lies in
  [budget × (1 - tolerance), budget × (1 + tolerance)], bounds included.
  """

  budget: int
  tolerance: float = 0.05
  num_layers: tuple[int, ...] = ()
  hidden_size: tuple[int, ...] = ()
  num_attention_heads: tuple[int, ...] = ()
  num_key_value_heads: tuple[int, ...] = ()
  intermediate_size: tuple[int, ...] = ()
  mlp_expansion: tuple[float, ...] = ()
  round_to: int = 1

  def __post_init__(self):
    budget = self.budget
    if _is_real(budget) and float(budget).is_integer():
      budget = int(budget)
    if not _is_int(budget) or budget < 1:
      raise ConfigError(f"search budget={self.budget!r} must be a positive whole parameter count")
    object.__setattr__(self, "budget", budget)
    if not _is_real(self.tolerance) or not 0 <= self.tolerance < 1:
      raise ConfigError(f"search tolerance={self.tolerance!r} must be a fraction in [0, 1)")
    if not _is_int(self.round_to) or self.round_to < 1:
      raise ConfigError(f"search round_to={self.round_to!r} must be a positive integer")
    for axis in AXES + ("mlp_expansion",):
      values = getattr(self, axis)
      if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ConfigError(f"search {axis}={values!r} must be a list of values (empty: keep the "
                          "source's)")
      values = tuple(values)
      valid = _is_real if axis == "mlp_expansion" else _is_int
      for value in values:
        if not valid(value) or value <= 0:
          kind = "positive numbers" if axis == "mlp_expansion" else "positive integers"
          raise ConfigError(f"search {axis} value {value!r} is invalid; allowed: {kind}")
      repeated = sorted({v for v in values if values.count(v) > 1})
      if repeated:
        raise ConfigError(f"search {axis} lists {repeated} more than once")
      object.__setattr__(self, axis, values)
    if self.intermediate_size and self.mlp_expansion:
      raise ConfigError("search space gives both intermediate_size and mlp_expansion; "
                        "allowed: one of them (or neither, to keep the source's MLP)")

  @property
  def window(self) -> tuple[int, int]:
    """The inclusive range of qualifying parameter counts."""
    budget, tolerance = Fraction(self.budget), _exact(self.tolerance)
    return math.ceil(budget * (1 - tolerance)), math.floor(budget * (1 + tolerance))

  def mlp_width(self, hidden_size: int, factor: float) -> int:
    """factor × hidden_size rounded to the nearest multiple of round_to (halves up)."""
    multiples = math.floor(_exact(factor) * hidden_size / self.round_to + Fraction(1, 2))
    return self.round_to * max(1, multiples)

  def grid(self, source: ModelConfig) -> list[dict[str, int]]:
    """Every combination of the axes, as full targets (source values fill empty axes)."""
    def axis(name: str) -> tuple[int, ...]:
      return getattr(self, name) or (getattr(source, name),)

    combos = []
    mlp_options = self.mlp_expansion or axis("intermediate_size")
    for layers, hidden, heads, groups, mlp in itertools.product(
        axis("num_layers"), axis("hidden_size"), axis("num_attention_heads"),
        axis("num_key_value_heads"), mlp_options):
      width = self.mlp_width(hidden, mlp) if self.mlp_expansion else mlp
      combos.append(dict(num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                         num_key_value_heads=groups, intermediate_size=width))
    return combos


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One pruned shape: absolute sizes for `prune.prune`, and its exact parameter count."""

  target: dict[str, int]
  num_params: int
  name: str

  def __post_init__(self):
    object.__setattr__(self, "target", {key: int(self.target[key]) for key in AXES})

  @classmethod
  def build(cls, source: ModelConfig, target: Mapping[str, int]) -> "Candidate":
    """The candidate for `target` (validated against `source`; missing keys keep its sizes)."""
    full = prune.validate_target(source, target)
    return cls(target=full, num_params=pruned_num_params(source, full), name=candidate_name(full))

  def to_dict(self) -> dict[str, Any]:
    return dict(name=self.name, num_params=self.num_params, target=dict(self.target))

  @classmethod
  def from_dict(cls, fields: Mapping[str, Any]) -> "Candidate":
    try:
      return cls(target=dict(fields["target"]), num_params=int(fields["num_params"]),
                 name=str(fields["name"]))
    except (KeyError, TypeError) as error:
      raise ConfigError(f"search candidate {dict(fields)!r} is malformed: {error!r}") from None


def candidate_name(target: Mapping[str, int]) -> str:
  """e.g. L32-D4096-H48-G8-F16384 (layers, hidden, heads, query groups, MLP width)."""
  return (f"L{target['num_layers']}-D{target['hidden_size']}-H{target['num_attention_heads']}"
          f"-G{target['num_key_value_heads']}-F{target['intermediate_size']}")


def pruned_num_params(source: ModelConfig, target: Mapping[str, int]) -> int:
  """Exact parameter count of `source` pruned to `target` (pruning only changes these sizes)."""
  changes = {key: int(value) for key, value in target.items()}
  if source.sliding_window_layers is not None:  # which layers survive does not change the count
    changes["sliding_window_layers"] = None
  return source.replace(**changes).num_params()


def enumerate_candidates(source: ModelConfig, space: SearchSpace) -> list[Candidate]:
  """Every feasible candidate of `space` within its parameter window, largest first (then name).

  Infeasible combinations (a size above the source's, heads not a multiple of the groups, more
  heads per group than the source has) are skipped; duplicates (factors that round to the same
  width) are kept once. Raises ConfigError when nothing qualifies.
  """
  low, high = space.window
  grid = space.grid(source)
  seen: dict[str, Candidate] = {}
  closest: Candidate | None = None
  for target in grid:
    try:
      candidate = Candidate.build(source, target)
    except ConfigError:
      continue
    if closest is None or (abs(candidate.num_params - space.budget)
                           < abs(closest.num_params - space.budget)):
      closest = candidate
    if low <= candidate.num_params <= high:
      seen.setdefault(candidate.name, candidate)
  if not seen:
    found = ("none was feasible for the source model" if closest is None else
             f"the closest was {closest.name} with {closest.num_params:,}")
    raise ConfigError(f"no search candidate has {low:,}..{high:,} parameters (budget "
                      f"{space.budget:,} ± {space.tolerance:g}); tried {len(grid)} combinations, "
                      f"{found}")
  return sorted(seen.values(), key=lambda c: (-c.num_params, c.name))


# ------------------------------------------------------------------------ the paper's search spaces

# Paper Table 13 ("Minitron 8B and 4B search space", Best Practice #9 in §4 / §2.4):
#   Target       Layers   Heads       MLP Exp. Factor   Embedding
#   Minitron 8B  [29-32]  {32,48}     {2.5,3,3.5,4}     {4096,4680,5120,5632,6144}
#   Minitron 4B  [29-32]  {24,32,48}  {2.5,3,3.5,4}     {2560,3072,3584,4096,4608}
# "a target parameter range of 8 and 4 billion parameters ... with a tolerance of 5%"; query groups
# are not searched (Minitron 8B and 4B keep Nemotron-4's 8). "4680" is a typo for 4608: the 8B
# candidates the paper lists (Table 20) use 4608 = 36 × 128, and every other size is a multiple
# of 128 (4680 is not).
PAPER_LAYERS = (29, 30, 31, 32)
PAPER_MLP_EXPANSION = (2.5, 3.0, 3.5, 4.0)


def paper_space_15b_to_8b(**overrides) -> SearchSpace:
  """Table 13, Minitron 8B row: Nemotron-4 15B -> 8B ± 5% (7.6B..8.4B).

  On `config.nemotron4_15b()` this yields 18 candidates; the paper reports 15 (Table 20), 13 of
  which are among our 18. The paper's 15 are exactly the grid points whose exact count (ours) lies
  in (7.772B, 8.551B): two of them (L32-D5120-H32-F12800 at 8.494B, L31-D4608-H32-F16128 at
  8.430B) are above 8.4B, and the five of ours the paper lacks (7.69B..7.77B) are below its lowest
  (7.871B). So the paper's window was, in exact counts, shifted up and narrower than 0.8B (its
  parameter counter or budget must have differed slightly from "8B ± 5%");
  `table20_window_space_15b_to_8b` reproduces Table 20 exactly.
  """
  fields = dict(budget=8_000_000_000, tolerance=0.05, num_layers=PAPER_LAYERS,
                hidden_size=(4096, 4608, 5120, 5632, 6144), num_attention_heads=(32, 48),
                mlp_expansion=PAPER_MLP_EXPANSION, round_to=128)
  return SearchSpace(**{**fields, **overrides})


def paper_space_15b_to_4b(**overrides) -> SearchSpace:
  """Table 13, Minitron 4B row: Nemotron-4 15B -> 4B ± 5% (3.8B..4.2B).

  On `config.nemotron4_15b()` this yields 18 candidates, as many as the paper reports (its 4B
  list is not printed, so which ones cannot be checked). The released Minitron 4B shape
  (L32-D3072-H24-G8-F9216, 4.19B) is the largest of them.
  """
  fields = dict(budget=4_000_000_000, tolerance=0.05, num_layers=PAPER_LAYERS,
                hidden_size=(2560, 3072, 3584, 4096, 4608), num_attention_heads=(24, 32, 48),
                mlp_expansion=PAPER_MLP_EXPANSION, round_to=128)
  return SearchSpace(**{**fields, **overrides})


def table20_window_space_15b_to_8b() -> SearchSpace:
  """The 8B grid with a window (8.17B ± 4.5% = 7.802B..8.538B) that gives exactly Table 20's 15."""
  return paper_space_15b_to_8b(budget=8_170_000_000, tolerance=0.045)


PAPER_SPACES = {"15b_to_8b": paper_space_15b_to_8b, "15b_to_4b": paper_space_15b_to_4b}


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


def check_eval_steps(eval_steps: Iterable[int]) -> tuple[int, ...]:
  """The step counts candidates are ranked at, sorted; one line for an empty or bad list."""
  steps = tuple(eval_steps)
  if not steps:
    raise ConfigError("search eval_steps is empty; allowed: one or more positive step counts")
  for step in steps:
    if not _is_int(step) or step < 1:
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
  ranking with the final step's (so the final step's are 1.0).
  """

  candidates: tuple[Candidate, ...]
  eval_steps: tuple[int, ...]
  losses: dict[str, dict[int, float]]

  def __post_init__(self):
    candidates = tuple(self.candidates)
    if not candidates:
      raise ConfigError("a search result needs at least one candidate")
    names = [c.name for c in candidates]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
      raise ConfigError(f"search candidates {repeated} appear more than once")
    steps = check_eval_steps(self.eval_steps)
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

  @property
  def best(self) -> Candidate:
    """Lowest validation loss at the last step."""
    return self.candidate(self.rankings[self.final_step][0])

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
    header = (["name", "layers", "hidden", "heads", "groups", "MLP", "params"]
              + [f"loss@{s}" for s in steps] + [f"rank@{s}" for s in steps])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in self.rankings[self.final_step]:
      candidate, target = self.candidate(name), self.candidate(name).target
      mlp = target["intermediate_size"]
      cells = [name, target["num_layers"], target["hidden_size"], target["num_attention_heads"],
               target["num_key_value_heads"], f"{mlp} ({mlp / target['hidden_size']:.3g}×)",
               f"{candidate.num_params:,}"]
      cells += [f"{self.losses[name][s]:.4f}" for s in steps]
      cells += [self.ranks[name][s] for s in steps]
      lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines.append("")
    best = self.best
    lines.append(f"Best: {best.name} ({best.num_params:,} parameters), validation loss "
                 f"{self.losses[best.name][self.final_step]:.4f} at step {self.final_step}.")
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
                 losses=fields["losses"])
    except (ValueError, KeyError, TypeError) as error:
      if isinstance(error, ConfigError):
        raise
      raise ConfigError(f"search result JSON is malformed: {error!r}") from None


def run_search(candidates: Sequence[Candidate],
               evaluate_fn: Callable[[Candidate], Mapping[int, float]],
               eval_steps: Iterable[int], *,
               done: Mapping[str, Mapping[int, float]] | None = None,
               on_result: Callable[[Candidate, dict[int, float]], None] | None = None,
               log: Callable[[str], None] | None = None) -> SearchResult:
  """Calls `evaluate_fn(candidate) -> {step: validation loss}` for each candidate not in `done`.

  `done` holds finished evaluations by candidate name (e.g. `SearchResult.losses` of an earlier,
  interrupted run); entries lacking a step of `eval_steps` are evaluated again and entries for
  names not among `candidates` are ignored. `on_result` sees each new evaluation (to save
  progress).
  """
  steps = check_eval_steps(eval_steps)
  candidates = tuple(candidates)
  log = log or (lambda message: None)
  names = {c.name for c in candidates}
  losses: dict[str, dict[int, float]] = {}
  for name, previous in (done or {}).items():
    if name not in names:
      log(f"[search] ignoring saved losses of {name}: not a candidate of this search")
      continue
    try:
      losses[name] = _losses_at(name, previous, steps)
    except ConfigError as error:
      log(f"[search] evaluating {name} again: {error}")
  todo = [c for c in candidates if c.name not in losses]
  if len(todo) < len(candidates):
    log(f"[search] {len(candidates) - len(todo)} of {len(candidates)} candidates already done")
  for index, candidate in enumerate(todo):
    losses[candidate.name] = _losses_at(candidate.name, evaluate_fn(candidate), steps)
    log(f"[search] {index + 1}/{len(todo)} {candidate.name}: loss "
        f"{losses[candidate.name][steps[-1]]:.4f} at step {steps[-1]}")
    if on_result is not None:
      on_result(candidate, dict(losses[candidate.name]))
  return SearchResult(candidates=candidates, eval_steps=steps, losses=losses)


def candidates_markdown(candidates: Sequence[Candidate]) -> str:
  """The enumerated candidates as a table, before any retraining."""
  lines = ["| # | name | layers | hidden | heads | groups | MLP | params |", "|" + "---|" * 8]
  for i, candidate in enumerate(candidates):
    t = candidate.target
    lines.append(f"| {i + 1} | {candidate.name} | {t['num_layers']} | {t['hidden_size']} | "
                 f"{t['num_attention_heads']} | {t['num_key_value_heads']} | "
                 f"{t['intermediate_size']} | {candidate.num_params:,} |")
  return "\n".join(lines) + "\n"
