"""The settings several stages share, typed: how importance is estimated (`Calibration`), how
pruning selects (`Selection`), a retraining before its models are known (`Retraining`) and the
search's candidates. plan.py parses each once from the run's config; nothing here reads it.
"""

from __future__ import annotations

import dataclasses

from minitron_jax.compress import search
from minitron_jax.inputs import data
from minitron_jax.models.config import ModelConfig
from minitron_jax.objectives.losses import LossConfig
from minitron_jax.training import distill
from minitron_jax.training.loop import LoopConfig


# ----------------------------------------------------------------------------- importance


@dataclasses.dataclass(frozen=True)
class Estimate:
  """How importance.estimate ranks: the aggregation (batch, sequence) and the layer scores."""

  aggregation: tuple[str, str] = ("l2", "mean")
  block_sizes: tuple[int, ...] = (1,)
  drop_loss: bool = False
  drop_block_sizes: tuple[int, ...] = (1,)
  drop_loss_batches: int = 8

  def options(self) -> dict:
    """importance.estimate's (and importance.check_options') keywords."""
    return dataclasses.asdict(self) | {"aggregation": tuple(self.aggregation)}

  def estimated(self) -> dict[str, tuple[int, ...]]:
    """The block sizes the scores will hold per depth criterion (prune.check_selection)."""
    return {"block_importance": self.block_sizes,
            "drop_loss": self.drop_block_sizes if self.drop_loss else ()}


@dataclasses.dataclass(frozen=True)
class Calibration:
  """The calibration batches importance is estimated on, and how."""

  data: data.DataConfig
  num_samples: int
  estimate: Estimate

  @property
  def num_batches(self) -> int:
    return -(-self.num_samples // self.data.batch_size)


# ----------------------------------------------------------------------------- pruning


@dataclasses.dataclass(frozen=True)
class Selection:
  """How prune.prune picks what it keeps."""

  aggregation: tuple[str, str] = ("l2", "mean")
  head_merging: bool = True
  depth_criterion: str = "block_importance"
  contiguous_depth: bool = False
  expert_criterion: str = "contribution"

  def options(self) -> dict:
    """prune.prune's keywords."""
    return dataclasses.asdict(self) | {"aggregation": tuple(self.aggregation)}

  def check_options(self, estimate: Estimate) -> dict:
    """prune.check_selection's keywords, with the block sizes `estimate` scores."""
    return dict(depth_criterion=self.depth_criterion, contiguous_depth=self.contiguous_depth,
                expert_criterion=self.expert_criterion, estimated=estimate.estimated())


# ----------------------------------------------------------------------------- retraining


@dataclasses.dataclass(frozen=True)
class RetrainSettings:
  """Everything a distillation run is built from, checked against the two architectures."""

  student_config: ModelConfig
  teacher_config: ModelConfig | None  # None when the loss needs no teacher
  losses: LossConfig
  optimizer: distill.OptimizerConfig
  loop: LoopConfig
  data: data.DataConfig


@dataclasses.dataclass(frozen=True)
class Retraining:
  """A training loop's settings before its models are known: the loss, optimizer, loop, data
  stream and how the two models compute. `for_models` checks them against the architectures."""

  losses: LossConfig
  optimizer: distill.OptimizerConfig
  loop: LoopConfig
  data: data.DataConfig
  dtype: str = "float32"
  remat: str = "none"

  @property
  def steps(self) -> int:
    return self.loop.steps

  def with_steps(self, steps: int) -> Retraining:
    return dataclasses.replace(self, loop=dataclasses.replace(self.loop, steps=steps))

  def for_models(self, student_config: ModelConfig, teacher_config: ModelConfig,
                 offline: bool = False) -> RetrainSettings:
    """The settings a retraining of these two architectures trains with, checked (one line for
    the first mismatch); offline: the teacher comes from the teacher_logits stage's store."""
    losses = self.losses
    student_config = student_config.replace(dtype=self.dtype, remat=self.remat)
    teacher_config = teacher_config.replace(dtype=self.dtype) if losses.uses_teacher else None
    distill.check_models(student_config, teacher_config, losses, offline_teacher=offline)
    if offline and teacher_config is not None and (
        teacher_config.vocab_size != student_config.vocab_size):
      distill.check_models(student_config, teacher_config, losses)  # names the vocab mismatch
    return RetrainSettings(student_config, teacher_config, losses, self.optimizer, self.loop,
                           self.data)


# ----------------------------------------------------------------------------- the search space


def search_candidates(space: search.SearchSpace, max_candidates: int,
                      config: ModelConfig) -> list[search.Candidate]:
  """The candidates the search retrains for a source architecture (no weight is needed)."""
  candidates = search.enumerate_candidates(config, space)
  if max_candidates and len(candidates) > max_candidates:
    # The ones nearest the constraints; the paper retrains every feasible candidate (0: all).
    nearest = sorted(candidates, key=lambda c: (space.distance(c), c.name))
    keep = {c.name for c in nearest[:max_candidates]}
    candidates = [c for c in candidates if c.name in keep]
  return candidates
