"""The search space of the lightweight architecture search (Minitron §2.4, Table 13): which pruned
shapes are candidates?

Pruning to a parameter budget has many answers (fewer layers, narrower embedding, fewer heads, a
smaller MLP, fewer or narrower experts). The paper enumerates every shape in a small grid of
common sizes whose exact parameter count lies within a tolerance of the budget. This module does
that enumeration: exact counts from `ModelConfig.num_params`, `num_active_params` and
`memory_bytes`, feasibility from `prune.validate_target`. Besides total parameters a search can
be held to per-token active parameters (what a mixture of experts computes with) and to serving
memory (weights plus KV cache), alone or together. search.py runs the search over the candidates.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from fractions import Fraction
from typing import Any, Iterable, Mapping, Sequence

from minitron_jax.compress import prune
from minitron_jax.models.config import MEMORY_DTYPES, ModelConfig
from minitron_jax.errors import ConfigError


# The searched sizes are the prunable ones: a dense model's, and a mixture's instead of
# intermediate_size. A candidate's target holds one of prune.TARGET_KINDS.
AXES = prune.COMMON_KEYS + prune.MLP_KEYS
MOE_AXES = prune.MOE_KEYS
_TARGET_KINDS = prune.TARGET_KINDS
# Constraint -> (the Candidate field it bounds, the unit its window is written in).
CONSTRAINTS = {"budget": ("num_params", "parameters"),
               "active_params": ("num_active_params", "active parameters"),
               "memory": ("memory_bytes", "bytes of memory")}


def _exact(number: float | int) -> Fraction:
  """The decimal the user wrote (0.05 is 1/20, not the nearest binary double)."""
  return Fraction(number) if isinstance(number, int) else Fraction(repr(float(number)))


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class SearchSpace:
  """Candidate sizes per axis, and the constraints they must meet.

  Constraints (each optional, 0 or None: not constrained; at least one must be given): `budget`
  total parameters, `active_params` parameters one token computes with (`num_active_params`:
  a mixture's experts not routed to are left out) and `memory` bytes of serving memory (every
  weight plus the KV cache of `memory_batch` sequences of `memory_seq_len` tokens, both at
  `memory_dtype`; `ModelConfig.memory_bytes`). Each given constraint c defines the window
  [c × (1 - tolerance), c × (1 + tolerance)], bounds included; a candidate qualifies when it lies
  in every given window. Unconstrained values are stored as 0 (so `dataclasses.asdict` gives
  an ml_collections config whose every field can be overridden from the command line).

  An empty tuple for an axis keeps the source model's value; only the axes pruning can change in
  the source (`prune.target_keys`) may be given. A dense MLP is given either as absolute
  `intermediate_size` values or as `mlp_expansion` factors of each candidate's hidden size; a
  factor's width is factor × hidden rounded to the nearest multiple of `round_to` (halves round
  up, never below `round_to`). A mixture of experts is searched over `num_experts`,
  `moe_intermediate_size` and (with a shared expert) `shared_expert_intermediate_size`.
  """

  budget: int = 0
  tolerance: float = 0.05
  active_params: int = 0
  memory: int = 0
  memory_batch: int = 1
  memory_seq_len: int = 4096
  memory_dtype: str = "bfloat16"
  num_layers: tuple[int, ...] = ()
  hidden_size: tuple[int, ...] = ()
  num_attention_heads: tuple[int, ...] = ()
  num_key_value_heads: tuple[int, ...] = ()
  intermediate_size: tuple[int, ...] = ()
  mlp_expansion: tuple[float, ...] = ()
  num_experts: tuple[int, ...] = ()
  moe_intermediate_size: tuple[int, ...] = ()
  shared_expert_intermediate_size: tuple[int, ...] = ()
  round_to: int = 1

  def __post_init__(self):
    given = {name: getattr(self, name) for name in CONSTRAINTS}
    for name, value in given.items():
      kind = "byte count" if name == "memory" else "parameter count"
      if value is None:
        value = 0
      elif _is_real(value) and float(value).is_integer():
        value = int(value)
      if not _is_int(value) or value < 0:
        raise ConfigError(f"search {name}={given[name]!r} must be a positive whole {kind} "
                          "(0 or None: not constrained)")
      object.__setattr__(self, name, value)
    if not self.constraints:
      shown = ", ".join(f"{name}={value!r}" for name, value in given.items())
      raise ConfigError(f"search space has no constraint ({shown}); allowed: a positive budget, "
                        "active_params or memory (alone or together)")
    if not _is_real(self.tolerance) or not 0 <= self.tolerance < 1:
      raise ConfigError(f"search tolerance={self.tolerance!r} must be a fraction in [0, 1)")
    for name in ("memory_batch", "memory_seq_len", "round_to"):
      value = getattr(self, name)
      if not _is_int(value) or value < 1:
        raise ConfigError(f"search {name}={value!r} must be a positive integer")
    if self.memory_dtype not in MEMORY_DTYPES:
      raise ConfigError(f"search memory_dtype={self.memory_dtype!r} is not supported; allowed: "
                        f"{sorted(MEMORY_DTYPES)}")
    for axis in AXES + ("mlp_expansion",) + MOE_AXES:
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
  def constraints(self) -> dict[str, int]:
    """The given constraints by name (budget, active_params, memory)."""
    return {name: getattr(self, name) for name in CONSTRAINTS if getattr(self, name)}

  @property
  def windows(self) -> dict[str, tuple[int, int]]:
    """The inclusive range of qualifying values of each given constraint."""
    tolerance = _exact(self.tolerance)
    return {name: (math.ceil(Fraction(c) * (1 - tolerance)),
                   math.floor(Fraction(c) * (1 + tolerance)))
            for name, c in self.constraints.items()}

  @property
  def window(self) -> tuple[int, int] | None:
    """The inclusive range of qualifying parameter counts (None: the budget is not given)."""
    return self.windows.get("budget")

  @property
  def memory_settings(self) -> dict[str, Any]:
    """What `Candidate.build` counts memory at."""
    return dict(memory_batch=self.memory_batch, memory_seq_len=self.memory_seq_len,
                memory_dtype=self.memory_dtype)

  def qualifies(self, candidate: "Candidate") -> bool:
    """Whether the candidate lies in every given window."""
    return all(low <= getattr(candidate, CONSTRAINTS[name][0]) <= high
               for name, (low, high) in self.windows.items())

  def distance(self, candidate: "Candidate") -> Fraction:
    """How far the candidate is from the constraints: the largest relative deviation from any
    of them (for the budget alone, ordering by it orders by |num_params - budget|)."""
    return max(abs(Fraction(getattr(candidate, CONSTRAINTS[name][0])) - c) / c
               for name, c in self.constraints.items())

  def describe(self) -> str:
    """e.g. '8,000,000,000 parameters and 2,000,000,000 active parameters' (for logs)."""
    parts = []
    for name, c in self.constraints.items():
      parts.append(f"{c:,} {CONSTRAINTS[name][1]}" + (
          f" ({self.memory_batch} x {self.memory_seq_len} tokens, {self.memory_dtype})"
          if name == "memory" else ""))
    return " and ".join(parts)

  def window_text(self, name: str) -> str:
    """e.g. '7,600,000,000..8,400,000,000 parameters (budget 8,000,000,000 ± 0.05)'."""
    (low, high), c = self.windows[name], self.constraints[name]
    text = f"{low:,}..{high:,} {CONSTRAINTS[name][1]} ({name} {c:,} ± {self.tolerance:g}"
    if name == "memory":
      text += (f", weights and the KV cache of {self.memory_batch} x {self.memory_seq_len} "
               f"tokens at {self.memory_dtype}")
    return text + ")"

  def mlp_width(self, hidden_size: int, factor: float) -> int:
    """factor × hidden_size rounded to the nearest multiple of round_to (halves up)."""
    multiples = math.floor(_exact(factor) * hidden_size / self.round_to + Fraction(1, 2))
    return self.round_to * max(1, multiples)

  def grid(self, source: ModelConfig) -> list[dict[str, int]]:
    """Every combination of the axes, as full targets over `prune.target_keys(source)` (source
    values fill empty axes). One-line ConfigError for an axis that does not apply to `source`."""
    keys = prune.target_keys(source)
    foreign = [axis for axis in AXES + ("mlp_expansion",) + MOE_AXES if getattr(self, axis)
               and (axis if axis != "mlp_expansion" else "intermediate_size") not in keys]
    if foreign:
      kind = "a mixture of experts" if source.is_moe else "a dense model"
      allowed = list(keys) + (["mlp_expansion"] if "intermediate_size" in keys else [])
      raise ConfigError(f"search axes {foreign} do not apply to {kind} ({source.family}); "
                        f"allowed: {allowed}")

    def options(key: str) -> tuple:
      if key == "intermediate_size" and self.mlp_expansion:
        return self.mlp_expansion
      return getattr(self, key) or (getattr(source, key),)

    combos = []
    for values in itertools.product(*(options(key) for key in keys)):
      target = dict(zip(keys, values))
      if "intermediate_size" in target and self.mlp_expansion:
        target["intermediate_size"] = self.mlp_width(target["hidden_size"],
                                                     target["intermediate_size"])
      combos.append(target)
    return combos


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One pruned shape: absolute sizes for `prune.prune` (exactly `prune.target_keys` of the
  source), its exact parameter count, active parameters per token and serving memory in bytes
  (at the search's memory settings). Candidates read from a search.json written before these were
  recorded have memory_bytes None (and, being dense, num_active_params = num_params)."""

  target: dict[str, int]
  num_params: int
  name: str
  num_active_params: int | None = None
  memory_bytes: int | None = None

  def __post_init__(self):
    target = dict(self.target)
    kind = next((keys for keys in _TARGET_KINDS if set(keys) == set(target)), None)
    if kind is None:
      raise ConfigError(f"search candidate target keys {sorted(target)} are not a pruning "
                        f"target; allowed: one of {[list(keys) for keys in _TARGET_KINDS]}")
    object.__setattr__(self, "target", {key: int(target[key]) for key in kind})
    if self.num_active_params is None and kind == AXES:  # a dense model uses every weight
      object.__setattr__(self, "num_active_params", self.num_params)

  @classmethod
  def build(cls, source: ModelConfig, target: Mapping[str, int], *, memory_batch: int = 1,
            memory_seq_len: int = 4096, memory_dtype: str = "bfloat16") -> "Candidate":
    """The candidate for `target` (validated against `source`; missing keys keep its sizes)."""
    full = prune.validate_target(source, target)
    config = pruned_config(source, full)
    return cls(target=full, num_params=config.num_params(), name=candidate_name(full),
               num_active_params=config.num_active_params(),
               memory_bytes=config.memory_bytes(memory_batch, memory_seq_len, memory_dtype))

  def to_dict(self) -> dict[str, Any]:
    return dict(name=self.name, num_params=self.num_params,
                num_active_params=self.num_active_params, memory_bytes=self.memory_bytes,
                target=dict(self.target))

  @classmethod
  def from_dict(cls, fields: Mapping[str, Any]) -> "Candidate":
    def optional(key):
      value = fields.get(key)
      return None if value is None else int(value)

    try:
      return cls(target=dict(fields["target"]), num_params=int(fields["num_params"]),
                 name=str(fields["name"]), num_active_params=optional("num_active_params"),
                 memory_bytes=optional("memory_bytes"))
    except (KeyError, TypeError, ValueError) as error:
      if isinstance(error, ConfigError):
        raise
      raise ConfigError(f"search candidate {dict(fields)!r} is malformed: {error!r}") from None


def candidate_name(target: Mapping[str, int]) -> str:
  """e.g. L32-D4096-H48-G8-F16384 (layers, hidden, heads, query groups, MLP width); a mixture
  of experts names experts and their width instead of F: L48-D2048-H32-G4-E64-M512, and a shared
  expert's width as -S…."""
  name = (f"L{target['num_layers']}-D{target['hidden_size']}-H{target['num_attention_heads']}"
          f"-G{target['num_key_value_heads']}")
  if "intermediate_size" in target:
    return name + f"-F{target['intermediate_size']}"
  name += f"-E{target['num_experts']}-M{target['moe_intermediate_size']}"
  if "shared_expert_intermediate_size" in target:
    name += f"-S{target['shared_expert_intermediate_size']}"
  return name


def pruned_config(source: ModelConfig, target: Mapping[str, int]) -> ModelConfig:
  """The architecture `source` pruned to `target` counts as (pruning only changes these sizes).

  Pruning experts below `num_experts_per_tok` routes each token to every kept expert, so k is
  clamped to them. Which sliding-window layers depth pruning keeps depends on the importance
  scores; the count assumes it keeps the full-attention ones first, so the KV cache (and memory)
  is the most the pruned model can need (parameter counts do not depend on it).
  """
  changes = {key: int(value) for key, value in target.items()}
  if source.is_moe:
    changes["num_experts_per_tok"] = min(source.num_experts_per_tok,
                                         changes.get("num_experts", source.num_experts))
  if source.sliding_window_layers is not None:
    kept = changes.get("num_layers", source.num_layers)
    changes["sliding_window_layers"] = tuple(sorted(source.sliding_window_layers))[:kept]
  return source.replace(**changes)


def pruned_num_params(source: ModelConfig, target: Mapping[str, int]) -> int:
  """Exact parameter count of `source` pruned to `target`."""
  return pruned_config(source, target).num_params()


def pruned_num_active_params(source: ModelConfig, target: Mapping[str, int]) -> int:
  """Parameters one token of `source` pruned to `target` computes with (`num_active_params`)."""
  return pruned_config(source, target).num_active_params()


def pruned_memory_bytes(source: ModelConfig, target: Mapping[str, int], batch: int = 1,
                        seq_len: int = 4096, dtype: str = "bfloat16") -> int:
  """Serving memory of `source` pruned to `target` (`ModelConfig.memory_bytes`)."""
  return pruned_config(source, target).memory_bytes(batch, seq_len, dtype)


def enumerate_candidates(source: ModelConfig, space: SearchSpace) -> list[Candidate]:
  """Every feasible candidate of `space` within all its windows, largest first (then name).

  Infeasible combinations (a size above the source's, heads not a multiple of the groups, more
  heads per group than the source has) are skipped; duplicates (factors that round to the same
  width) are kept once. Raises ConfigError when nothing qualifies, naming every constraint and
  the closest candidate (the smallest largest relative deviation from them).
  """
  grid = space.grid(source)
  seen: dict[str, Candidate] = {}
  closest: tuple[Fraction, Candidate] | None = None
  for target in grid:
    try:
      candidate = Candidate.build(source, target, **space.memory_settings)
    except ConfigError:
      continue
    distance = space.distance(candidate)
    if closest is None or distance < closest[0]:
      closest = distance, candidate
    if space.qualifies(candidate):
      seen.setdefault(candidate.name, candidate)
  if not seen:
    if closest is None:
      found = "none was feasible for the source model"
    else:
      c = closest[1]
      found = (f"the closest was {c.name} with {c.num_params:,} parameters, "
               f"{c.num_active_params:,} active, {c.memory_bytes:,} bytes of memory")
    windows = " and ".join(space.window_text(name) for name in space.constraints)
    raise ConfigError(f"no search candidate has {windows}; tried {len(grid)} combinations, "
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

  On `config.preset("nemotron4_15b")` this yields 18 candidates; the paper reports 15 (Table 20), 13 of
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

  On `config.preset("nemotron4_15b")` this yields 18 candidates, as many as the paper reports (its 4B
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


def _mlp_cell(target: Mapping[str, int], ratio: bool = False) -> str:
  """A dense MLP's width (and its ratio to hidden); a mixture's experts x their width (+ shared)."""
  if "intermediate_size" in target:
    mlp = target["intermediate_size"]
    return f"{mlp} ({mlp / target['hidden_size']:.3g}×)" if ratio else str(mlp)
  cell = f"{target['num_experts']} × {target['moe_intermediate_size']}"
  if "shared_expert_intermediate_size" in target:
    cell += f" + shared {target['shared_expert_intermediate_size']}"
  return cell


def _size_cells(candidate: Candidate) -> list[str]:
  """params, active params and memory bytes (a dash where an old search.json lacks one)."""
  return [f"{value:,}" if value is not None else "–"
          for value in (candidate.num_params, candidate.num_active_params,
                        candidate.memory_bytes)]


def candidates_markdown(candidates: Sequence[Candidate]) -> str:
  """The enumerated candidates as a table, before any retraining (memory in bytes, at the
  search's memory settings)."""
  header = ["#", "name", "layers", "hidden", "heads", "groups", "MLP", "params", "active",
            "memory"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for i, candidate in enumerate(candidates):
    t = candidate.target
    cells = [i + 1, candidate.name, t["num_layers"], t["hidden_size"], t["num_attention_heads"],
             t["num_key_value_heads"], _mlp_cell(t)] + _size_cells(candidate)
    lines.append("| " + " | ".join(str(c) for c in cells) + " |")
  return "\n".join(lines) + "\n"
