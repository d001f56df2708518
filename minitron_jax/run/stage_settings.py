"""A run's settings as the library's arguments, shared by several stages and by validation:
importance and pruning options, the loss, optimizer and loop of a retraining, the search space
and its candidates. Pure: building them reads no weights, so validation builds them too.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from minitron_jax.compress import search
from minitron_jax.errors import ConfigError
from minitron_jax.inputs import data
from minitron_jax.models.config import ModelConfig
from minitron_jax.objectives.losses import LossConfig
from minitron_jax.run.stage_context import data_config
from minitron_jax.training import distill
from minitron_jax.training.loop import LoopConfig


def estimate_options(cfg: ml_collections.ConfigDict) -> dict:
  section = cfg.importance
  return dict(aggregation=(section.batch_aggregation, section.seq_aggregation),
              block_sizes=tuple(section.block_sizes), drop_loss=section.drop_loss,
              drop_block_sizes=tuple(section.drop_block_sizes),
              drop_loss_batches=section.drop_loss_batches)


def prune_options(cfg: ml_collections.ConfigDict) -> dict:
  return dict(aggregation=(cfg.importance.batch_aggregation, cfg.importance.seq_aggregation),
              head_merging=cfg.prune.head_merging, depth_criterion=cfg.prune.depth_criterion,
              contiguous_depth=cfg.prune.contiguous_depth,
              expert_criterion=cfg.prune.expert_criterion)


def settings(cls, fields: dict, what: str):
  """cls(**fields) for a frozen settings dataclass; an unknown field is a one-line ConfigError
  (the constructor would raise a TypeError)."""
  allowed = [f.name for f in dataclasses.fields(cls)]
  unknown = sorted(set(fields) - set(allowed))
  if unknown:
    raise ConfigError(f"{what} fields {unknown} are unknown; allowed: {allowed}")
  return cls(**fields)


def loss_config(section: ml_collections.ConfigDict) -> LossConfig:
  fields = section.to_dict()
  fields["hidden_pairs"] = tuple(tuple(pair) for pair in fields.get("hidden_pairs", ()))
  return settings(LossConfig, fields, "loss")


def optimizer_config(section: ml_collections.ConfigDict,
                     batch_size: int | None = None) -> distill.OptimizerConfig:
  """The optimizer; with `batch_size`, also that its micro-batches split it evenly."""
  optimizer = settings(distill.OptimizerConfig, section.to_dict(), "optimizer")
  if batch_size is not None and batch_size % optimizer.accumulation_steps:
    raise ConfigError(f"accumulation_steps={optimizer.accumulation_steps} does not divide "
                      f"batch_size={batch_size}; allowed: a divisor of the batch size")
  return optimizer


def loop_config(section: ml_collections.ConfigDict, steps: int, eval_steps=(),
                checkpoint_every=None) -> LoopConfig:
  return LoopConfig(steps=steps, log_every=section.log_every,
                            eval_every=section.eval_every, eval_steps=tuple(eval_steps),
                            checkpoint_every=checkpoint_every or section.checkpoint_every,
                            keep_checkpoints=section.keep_checkpoints,
                            max_bad_steps=section.get("max_bad_steps", 0))


@dataclasses.dataclass(frozen=True)
class RetrainSettings:
  """Everything a distillation run is built from, checked against the two architectures."""

  student_config: ModelConfig
  teacher_config: ModelConfig | None  # None when the loss needs no teacher
  losses: LossConfig
  optimizer: distill.OptimizerConfig
  loop: LoopConfig
  data: data.DataConfig


def retrain_settings(cfg: ml_collections.ConfigDict, section: ml_collections.ConfigDict,
                     student_config: ModelConfig, teacher_config: ModelConfig, steps: int,
                     eval_steps=(), checkpoint_every=None, offline: bool = False
                     ) -> RetrainSettings:
  """The settings `_retrain` trains with; pure, so whole-run validation builds them too.
  offline: the teacher comes from the teacher_logits stage's store."""
  losses = loss_config(section.loss)
  student_config = student_config.replace(dtype=section.dtype, remat=section.remat)
  teacher_config = teacher_config.replace(dtype=section.dtype) if losses.uses_teacher else None
  distill.check_models(student_config, teacher_config, losses, offline_teacher=offline)
  if offline and teacher_config is not None and (
      teacher_config.vocab_size != student_config.vocab_size):
    distill.check_models(student_config, teacher_config, losses)  # names the vocab mismatch
  train_data = data_config(cfg, batch_size=section.batch_size, seq_len=section.seq_len)
  loop = loop_config(section, steps, eval_steps, checkpoint_every)
  optimizer = optimizer_config(section.optimizer, train_data.batch_size)
  return RetrainSettings(student_config, teacher_config, losses, optimizer, loop, train_data)


def teacher_correction_section(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The distill settings teacher correction trains with: its own optimizer, cross-entropy only."""
  section = ml_collections.ConfigDict(cfg.distill.to_dict())
  section.update(optimizer=cfg.teacher_correction.optimizer.to_dict(),
                 loss=dict(LossConfig.cross_entropy_only().__dict__))
  return section


def search_space(cfg: ml_collections.ConfigDict) -> search.SearchSpace:
  fields = {k: tuple(v) if isinstance(v, (list, tuple)) else v
            for k, v in cfg.search.space.to_dict().items()}
  return settings(search.SearchSpace, fields, "search space")


def search_candidates(cfg: ml_collections.ConfigDict,
                      config: ModelConfig) -> list[search.Candidate]:
  """The candidates the search retrains for a source architecture (no weight is needed)."""
  section = cfg.search
  if not isinstance(section.max_candidates, int) or section.max_candidates < 0:
    raise ConfigError(f"search.max_candidates={section.max_candidates!r} must be 0 (every "
                      "candidate) or a positive integer")
  space = search_space(cfg)
  candidates = search.enumerate_candidates(config, space)
  if section.max_candidates and len(candidates) > section.max_candidates:
    # The ones nearest the constraints; the paper retrains every feasible candidate (0: all).
    nearest = sorted(candidates, key=lambda c: (space.distance(c), c.name))
    keep = {c.name for c in nearest[:section.max_candidates]}
    candidates = [c for c in candidates if c.name in keep]
  return candidates
