"""A run planned once: its ml-collections config turned into a typed, frozen
`stage_context.Plan` (the mesh, the model source, the data, the compression stages with their
targets, and each stage's own settings object), before anything computes.

This is the one module that parses the config's sections (validation reads the model, mesh and
stage names before it, to name their problems first): every stage reads its settings from the
plan (`ctx.settings`), never the config. Parsing notes every problem it finds (a bad setting
hides no other); validation (validate.py) then checks the plan against the model's shapes and
files, and the pipeline runs only a plan with no problem.
"""

from __future__ import annotations

import dataclasses
import pathlib
import types
from typing import Any, Mapping

import ml_collections

from minitron_jax.checkpoints import build
from minitron_jax.compress import search
from minitron_jax.errors import ConfigError
from minitron_jax.inputs import data
from minitron_jax.models import config as config_lib, partitioning
from minitron_jax.objectives.losses import LossConfig
from minitron_jax.run import problems as problems_lib, registry, search_score, task_config
from minitron_jax.run import teacher_logits_inputs
from minitron_jax.run.problems import Problems
from minitron_jax.run.stage_context import CompressionStep, Plan
from minitron_jax.run.stage_settings import Calibration, Estimate, Retraining, Selection
from minitron_jax.run.stages import prune as prune_stage
from minitron_jax.run.stages import report as report_stage
from minitron_jax.run.stages import search as search_stage
from minitron_jax.training import distill, teacher_logits_store
from minitron_jax.training.loop import LoopConfig

TEACHER_CHOICES = ("original", "previous")


def build_plan(cfg: ml_collections.ConfigDict, workdir: str | pathlib.Path,
               problems: Problems | None = None) -> Plan:
  """The plan of `cfg` in `workdir`. With `problems`, every problem is noted there and the plan
  keeps None where a setting could not be parsed (such a plan is checked, never run); without,
  any problem raises one ConfigError."""
  raising = problems is None
  problems = Problems() if raising else problems
  workdir = pathlib.Path(workdir).absolute()
  stages = tuple(name for name in cfg.stages if name in registry.BY_NAME)
  mesh = problems.attempt("mesh", settings, partitioning.MeshConfig, cfg.mesh.to_dict(), "mesh")
  if not isinstance(cfg.eval_batches, int) or cfg.eval_batches < 1:
    problems.note("eval_batches", f"{cfg.eval_batches!r} must be a positive integer")
  if cfg.export_dtype not in config_lib.DTYPES:
    problems.note("export_dtype", f"{cfg.export_dtype!r} is not supported; allowed: "
                  f"{config_lib.DTYPES}")
  stream = problems.attempt("data", data_config, cfg.data)
  compression = problems.attempt("compression", compression_steps, cfg, workdir)
  stage_settings = {name: _PARSERS[name](cfg, problems, stages) for name in registry.NAMES
                    if name in stages and name in _PARSERS}
  if raising and problems:
    raise problems_lib.error(problems.lines)
  return Plan(workdir=workdir, stages=stages, mesh=mesh, model=build.ModelSource.of(cfg.model),
              tokenizer=cfg.tokenizer, data=stream, eval_batches=cfg.eval_batches,
              export_dtype=cfg.export_dtype, compression=compression or (),
              settings=types.MappingProxyType(stage_settings))


def compression_steps(cfg: ml_collections.ConfigDict,
                      workdir: pathlib.Path) -> tuple[CompressionStep, ...]:
  """The compression stages `config.compression` lists (one, unnamed, in the workdir, with
  `config.prune.target`, when it lists none)."""
  entries = list(cfg.get("compression", ()) or ())
  if not entries:
    return (CompressionStep("", workdir, types.MappingProxyType(dict(cfg.prune.target))),)
  steps = []
  for index, entry in enumerate(entries):
    entry = dict(entry)
    name = entry.get("name") or f"stage{index + 1}"
    teacher = entry.get("teacher", "original")
    if teacher not in TEACHER_CHOICES:
      raise ConfigError(f"compression stage {name!r} teacher={teacher!r} is not allowed; "
                        f"allowed: {TEACHER_CHOICES}")
    steps.append(CompressionStep(name, workdir / f"{index + 1}_{name}",
                                 types.MappingProxyType(dict(entry.get("target", {}))), teacher,
                                 entry.get("distill_steps")))
  return tuple(steps)


# ----------------------------------------------------------------------------- sections


def settings(cls, fields: Mapping[str, Any], what: str):
  """cls(**fields) for a frozen settings dataclass; an unknown field is a one-line ConfigError
  (the constructor would raise a TypeError)."""
  allowed = [f.name for f in dataclasses.fields(cls)]
  unknown = sorted(set(fields) - set(allowed))
  if unknown:
    raise ConfigError(f"{what} fields {unknown} are unknown; allowed: {allowed}")
  return cls(**fields)


def _fields(section) -> dict:
  return section.to_dict() if hasattr(section, "to_dict") else dict(section)


def data_config(data_section, **changes) -> data.DataConfig:
  """The run's `data` settings (a section or a dict) with `changes`."""
  return data.DataConfig.from_dict({**_fields(data_section), **changes})


def estimate_of(cfg: ml_collections.ConfigDict) -> Estimate:
  section = cfg.importance
  return Estimate(aggregation=(section.batch_aggregation, section.seq_aggregation),
                  block_sizes=tuple(section.block_sizes), drop_loss=section.drop_loss,
                  drop_block_sizes=tuple(section.drop_block_sizes),
                  drop_loss_batches=section.drop_loss_batches)


def calibration(cfg: ml_collections.ConfigDict, problems: Problems) -> Calibration | None:
  section = cfg.importance
  samples_ok = isinstance(section.num_samples, int) and section.num_samples >= 1
  if not samples_ok:
    problems.note("importance.num_samples", f"{section.num_samples!r} must be a positive integer")
  stream = problems.attempt("importance", data_config, cfg.data, seq_len=section.seq_len,
                            batch_size=section.batch_size)
  estimate = problems.attempt("importance", estimate_of, cfg)
  if not samples_ok or stream is None or estimate is None:
    return None
  return Calibration(stream, section.num_samples, estimate)


def selection_of(cfg: ml_collections.ConfigDict) -> Selection:
  return Selection(aggregation=(cfg.importance.batch_aggregation, cfg.importance.seq_aggregation),
                   head_merging=cfg.prune.head_merging, depth_criterion=cfg.prune.depth_criterion,
                   contiguous_depth=cfg.prune.contiguous_depth,
                   expert_criterion=cfg.prune.expert_criterion)


def loss_config(section) -> LossConfig:
  fields = _fields(section)
  fields["hidden_pairs"] = tuple(tuple(pair) for pair in fields.get("hidden_pairs", ()))
  return settings(LossConfig, fields, "loss")


def optimizer_config(section, batch_size: int | None = None) -> distill.OptimizerConfig:
  """The optimizer; with `batch_size`, also that its micro-batches split it evenly."""
  optimizer = settings(distill.OptimizerConfig, _fields(section), "optimizer")
  if batch_size is not None and batch_size % optimizer.accumulation_steps:
    raise ConfigError(f"accumulation_steps={optimizer.accumulation_steps} does not divide "
                      f"batch_size={batch_size}; allowed: a divisor of the batch size")
  return optimizer


def loop_config(section, steps: int, eval_steps=(), checkpoint_every=None) -> LoopConfig:
  return LoopConfig(steps=steps, log_every=section.log_every, eval_every=section.eval_every,
                    eval_steps=tuple(eval_steps),
                    checkpoint_every=checkpoint_every or section.checkpoint_every,
                    keep_checkpoints=section.keep_checkpoints,
                    max_bad_steps=section.get("max_bad_steps", 0))


def retraining(cfg: ml_collections.ConfigDict, problems: Problems, name: str, section,
               steps: int, *, eval_steps=(), checkpoint_every=None,
               optimizer_setting: str = "distill.optimizer") -> Retraining | None:
  """The `name` retraining of `section` (distill's settings, or teacher correction's) for
  `steps`, after noting every problem found: None without a loss; a setting that could not be
  parsed is None in it (a plan with problems is only checked, never run)."""
  loss_section = "distill" if name == "search" else name  # the search retrains with distill's
  losses = problems.attempt(f"{loss_section}.loss", loss_config, section.loss)
  optimizer = problems.attempt(optimizer_setting, optimizer_config, section.optimizer,
                               section.batch_size)
  loop = problems.attempt(name, loop_config, section, steps, eval_steps, checkpoint_every)
  stream = problems.attempt("distill", data_config, cfg.data, batch_size=section.batch_size,
                            seq_len=section.seq_len)
  if losses is None:
    return None
  return Retraining(losses, optimizer, loop, stream, dtype=section.dtype, remat=section.remat)


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


def evaluate_settings(section) -> task_config.EvaluateSettings:
  harness = section.lm_eval
  prompts = section.prompts
  return task_config.EvaluateSettings(
      tasks=types.MappingProxyType({name: types.MappingProxyType(dict(spec))
                                    for name, spec in section.tasks.items()}),
      batch_size=section.batch_size, max_length=section.max_length,
      lm_eval=task_config.HarnessSettings(
          tasks=harness.tasks, own_tasks=harness.own_tasks, include_path=harness.include_path,
          num_fewshot=harness.num_fewshot, limit=harness.limit),
      prompts=prompts if isinstance(prompts, str) else tuple(prompts),
      max_new_tokens=section.max_new_tokens)


def store_settings(cfg: ml_collections.ConfigDict,
                   stages: tuple[str, ...]) -> teacher_logits_inputs.StoreSettings:
  section = cfg.teacher_logits
  if section.dtype not in teacher_logits_store.STORE_DTYPES:
    raise ConfigError(f"teacher_logits.dtype={section.dtype!r} is not supported; allowed: "
                      f"{sorted(teacher_logits_store.STORE_DTYPES)}")
  for name in ("k", "rows_per_shard", "batch_size"):
    value = section[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ConfigError(f"teacher_logits.{name}={value!r} must be a positive integer")
  return teacher_logits_inputs.StoreSettings(
      k=section.k, dtype=section.dtype, rows_per_shard=section.rows_per_shard,
      batch_size=section.batch_size,
      train=data_config(cfg.data, batch_size=cfg.distill.batch_size, seq_len=cfg.distill.seq_len),
      compute_dtype=cfg.distill.dtype, temperature=float(cfg.distill.loss.temperature),
      distill_steps=cfg.distill.steps if "distill" in stages else None,
      search_steps=cfg.search.retrain_steps if "search" in stages else None)


# ----------------------------------------------------------------------------- each stage's


def _teacher_correction(cfg, problems, stages):
  return retraining(cfg, problems, "teacher_correction", teacher_correction_section(cfg),
                    cfg.teacher_correction.steps,
                    optimizer_setting="teacher_correction.optimizer")


def _teacher_logits(cfg, problems, stages):
  return problems.attempt("teacher_logits", store_settings, cfg, stages)


def _importance(cfg, problems, stages):
  return calibration(cfg, problems)


def _search(cfg, problems, stages):
  section = cfg.search
  trained = retraining(cfg, problems, "search", cfg.distill, section.retrain_steps,
                       eval_steps=section.eval_steps, checkpoint_every=section.retrain_steps)
  problems.attempt("search.eval_steps", search.check_eval_steps, section.eval_steps)
  space = problems.attempt("search.space", search_space, cfg)
  if not isinstance(section.max_candidates, int) or section.max_candidates < 0:
    problems.note("search.space", f"search.max_candidates={section.max_candidates!r} must be 0 "
                  "(every candidate) or a positive integer")
    space = None
  score = problems.attempt("search.score", search_score.parse, section.get("score", ""),
                           section.get("score_at", "retrained"))
  selection = problems.attempt("prune", selection_of, cfg)
  estimate = problems.attempt("importance", estimate_of, cfg)
  scoring = problems.attempt("evaluate", evaluate_settings, cfg.evaluate)
  if None in (selection, estimate, scoring):
    return None
  # A plan with problems keeps what parsed (space, score and retraining may be None), so that
  # validation checks the rest.
  return search_stage.SearchSettings(
      space=space, max_candidates=section.max_candidates, eval_steps=tuple(section.eval_steps),
      score=score, retraining=trained, selection=selection, estimate=estimate, scoring=scoring)


def _prune(cfg, problems, stages):
  rounds = cfg.prune.iterative_rounds
  calibrated = calibration(cfg, problems) if rounds > 1 else None
  estimate = problems.attempt("importance", estimate_of, cfg)
  selection = problems.attempt("prune", selection_of, cfg)
  if selection is None or estimate is None:
    return None
  return prune_stage.PruneSettings(
      selection=selection, estimate=estimate, iterative_rounds=rounds, calibration=calibrated,
      reinitialize=bool(cfg.prune.get("reinitialize", False)),
      reinitialize_seed=cfg.model.get("seed", 0) + 1)


def _distill(cfg, problems, stages):
  return retraining(cfg, problems, "distill", cfg.distill, cfg.distill.steps)


def _evaluate(cfg, problems, stages):
  return problems.attempt("evaluate", evaluate_settings, cfg.evaluate)


def _report(cfg, problems, stages):
  return report_stage.ReportSettings(batch_size=cfg.distill.batch_size,
                                     seq_len=cfg.distill.seq_len)


# Stage name -> its settings parser (cfg, problems, stages); a stage absent has none of its own.
_PARSERS = {"teacher_correction": _teacher_correction, "teacher_logits": _teacher_logits,
            "importance": _importance, "search": _search, "prune": _prune, "distill": _distill,
            "evaluate": _evaluate, "report": _report}
