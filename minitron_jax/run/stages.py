"""The stages of the main job: thin adapters from config to library.

A stage reads `Context`: which model it starts from, which model teaches, the target size and the
directory its outputs go to. Models are `ModelRef`s: the original (from `config.model`, or the
corrected teacher when teacher correction ran) or a model an earlier stage saved. Every stage reads
its data through `data` with the configured tokenizer.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import pathlib
import time

import ml_collections

from minitron_jax.checkpoints import checkpoint, hf
from minitron_jax.compress import importance, prune, search
from minitron_jax.core import atomic, distributed, preemption
from minitron_jax.inputs import data
from minitron_jax.models import model, sharding
from minitron_jax.run import search_score, teacher_logits
from minitron_jax.training import distill
from minitron_jax.core.atomic import write_json  # noqa: F401  (stages.write_json: sweeps use it)
from minitron_jax.models.config import ModelConfig
from minitron_jax.errors import ConfigError
from minitron_jax.objectives.losses import LossConfig
# The models, data and mesh every stage reads: stage_context.py, re-exported here.
from minitron_jax.run.stage_context import (Context, ModelRef, data_config, load,  # noqa: F401
                                        load_tokenizer, mesh_of, validation)


# ----------------------------------------------------------------------------- the plan


TEACHER_CHOICES = ("original", "previous")


def compression_plan(cfg: ml_collections.ConfigDict, workdir: pathlib.Path) -> list[dict]:
  """One dict per compression stage: name, directory, target, teacher, distill_steps."""
  entries = list(cfg.get("compression", ()) or ())
  if not entries:
    return [dict(name="", directory=workdir, target=dict(cfg.prune.target), teacher="original",
                 distill_steps=None)]
  plan = []
  for index, entry in enumerate(entries):
    entry = dict(entry)
    name = entry.get("name") or f"stage{index + 1}"
    teacher = entry.get("teacher", "original")
    if teacher not in TEACHER_CHOICES:
      raise ConfigError(f"compression stage {name!r} teacher={teacher!r} is not allowed; "
                        f"allowed: {TEACHER_CHOICES}")
    plan.append(dict(name=name, directory=workdir / f"{index + 1}_{name}",
                     target=dict(entry.get("target", {})), teacher=teacher,
                     distill_steps=entry.get("distill_steps")))
  return plan


def models_of(cfg: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict[str, ModelRef]:
  """Every model the run can produce, by label, in order: the teacher, then each stage's pruned
  and distilled students (callers skip those not saved yet)."""
  original = original_ref(cfg, workdir)
  refs = {"teacher": original}
  for step in compression_plan(cfg, workdir):
    prefix = f"{step['name']} " if step["name"] else ""
    for kind in ("prune", "distill"):
      path = step["directory"] / kind / "model"
      label = f"{prefix}{'pruned' if kind == 'prune' else 'distilled'}"
      refs[label] = ModelRef(path, label)
  return refs


def original_ref(cfg, workdir: pathlib.Path) -> ModelRef:
  """The model compression starts from: the corrected teacher when correction is a stage."""
  if "teacher_correction" in cfg.stages:
    return ModelRef(workdir / "teacher_correction" / "model", "corrected teacher")
  return ModelRef(None, "original")


# ----------------------------------------------------------------------------- shared pieces


def _calibration(cfg: ml_collections.ConfigDict, vocab_size: int) -> list:
  section = cfg.importance
  batches = -(-section.num_samples // section.batch_size)
  iterator = data.make_iterator(
      data_config(cfg, seq_len=section.seq_len, batch_size=section.batch_size),
      load_tokenizer(cfg, vocab_size), "train")
  return list(itertools.islice(iterator, batches))


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
                checkpoint_every=None) -> distill.LoopConfig:
  return distill.LoopConfig(steps=steps, log_every=section.log_every,
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
  loop: distill.LoopConfig
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


# ----------------------------------------------------------------------------- stages


def run_importance(ctx: Context) -> dict:
  with atomic.directory(ctx.directory / "importance") as staging:
    return _importance(ctx, staging)


def _importance(ctx: Context, staging: pathlib.Path) -> dict:
  cfg, out = ctx.cfg, ctx.directory / "importance"
  started = time.perf_counter()
  mesh = mesh_of(cfg)
  config, params = load(cfg, ctx.source, mesh)
  batches = _calibration(cfg, config.vocab_size)
  ctx.log(f"[importance] {len(batches) * cfg.importance.batch_size} calibration samples of "
          f"{cfg.importance.seq_len} tokens, {config.num_params():,}-parameter {ctx.source.label} "
          "model")
  scores = importance.estimate(
      config, params, batches, batch_sharding=lambda shape: sharding.batch_sharding(mesh, shape),
      log=ctx.log, **estimate_options(cfg))
  scores.save(staging)
  ctx.log(f"[importance] done in {time.perf_counter() - started:.1f}s; scores in {out}")
  return scores.summary()


def chosen_target(ctx: Context) -> dict:
  """The search's best candidate when a search ran here, else the configured target."""
  result = ctx.directory / "search" / "result.json"
  if result.exists():
    return search.SearchResult.from_json(result.read_text()).best.target
  if not ctx.target:
    raise ConfigError("no prune target: set prune.target (or compression stages), or run search")
  return dict(ctx.target)


def run_prune(ctx: Context) -> dict:
  with atomic.directory(ctx.directory / "prune") as staging:
    return _prune(ctx, staging)


def _prune(ctx: Context, staging: pathlib.Path) -> dict:
  cfg, out = ctx.cfg, ctx.directory / "prune"
  started = time.perf_counter()
  config, params = load(cfg, ctx.source, mesh_of(cfg))
  target = chosen_target(ctx)
  if cfg.prune.iterative_rounds > 1:
    # Paper Table 10: re-estimate on the partly pruned model between rounds.
    ctx.log(f"[prune] iterative importance over {cfg.prune.iterative_rounds} rounds")
    pruned_config, pruned, _ = prune.iterative_prune(
        config, distributed.to_host(params), lambda: _calibration(cfg, config.vocab_size), target,
        rounds=cfg.prune.iterative_rounds, log=ctx.log, estimate_options=estimate_options(cfg),
        **prune_options(cfg))
  else:
    scores = importance.Scores.load(ctx.directory / "importance")
    pruned_config, pruned = prune.prune(config, distributed.to_host(params), scores, target,
                                        **prune_options(cfg))
  reinitialize = bool(cfg.prune.get("reinitialize", False))
  if reinitialize:
    ctx.log("[prune] reinitialize: the target architecture with random weights")
    pruned = model.init(pruned_config, cfg.model.seed + 1)
  batches = validation(cfg, config.vocab_size)
  losses = {name: importance.lm_loss(c, p, batches)
            for name, (c, p) in (("source", (config, params)), ("pruned", (pruned_config, pruned)))}
  ctx.log(f"[prune] {config.num_params():,} -> {pruned_config.num_params():,} parameters "
          f"({pruned_config.num_params() / config.num_params():.1%}); zero-shot validation loss "
          f"{losses['source']:.4f} -> {losses['pruned']:.4f}")
  hf.save(staging / "hf", pruned_config, pruned, dtype=cfg.export_dtype)
  checkpoint.save_model(staging / "model", pruned_config.replace(dtype="float32", remat="none"),
                        pruned)
  summary = dict(source=config.to_dict(), pruned=pruned_config.to_dict(), target=target,
                 source_params=config.num_params(), pruned_params=pruned_config.num_params(),
                 source_validation_loss=losses["source"], pruned_validation_loss=losses["pruned"],
                 reinitialized=reinitialize,
                 seconds=time.perf_counter() - started)
  write_json(staging / "summary.json", summary)
  ctx.log(f"[prune] done in {summary['seconds']:.1f}s; orbax checkpoint in {out / 'model'}, "
          f"Hugging Face export in {out / 'hf'}")
  return summary


def _retrain(cfg, section, student_config, student, teacher_config, teacher, out: pathlib.Path,
             steps: int, log, eval_steps=(), checkpoint_every=None, label: str = "distill",
             offline: OfflineTeacher | None = None):
  """Distils `student` from `teacher` (or the stored one) for `steps` steps; (trained params,
  final metrics)."""
  mesh = mesh_of(cfg)
  run = retrain_settings(cfg, section, student_config, teacher_config, steps, eval_steps,
                         checkpoint_every, offline=offline is not None)
  distiller = distill.Distiller(run.student_config, run.teacher_config, run.losses, run.optimizer,
                                steps, skip_non_finite=run.loop.max_bad_steps > 0,
                                offline_teacher=offline is not None)
  if offline is not None:
    train_batches, validation_batches = teacher_logits.retrain_inputs(
        cfg, offline.directory, offline.teacher, teacher_config, run.data.batch_size, steps,
        offline.distill_steps)
  else:
    tok = load_tokenizer(cfg, run.student_config.vocab_size)
    train_batches = data.make_iterator(run.data, tok, "train")
    validation_batches = validation(cfg, run.student_config.vocab_size)
  return distill.train(distiller, student, teacher, train_batches, validation_batches, run.loop,
                       out, batch_sharding=lambda shape: sharding.batch_sharding(mesh, shape),
                       log=log, label=label)


@dataclasses.dataclass(frozen=True)
class OfflineTeacher:
  """Where a compression stage's teacher store is, and which teacher it must hold."""

  directory: pathlib.Path
  teacher: ModelRef
  distill_steps: int | None


def _teacher(ctx: Context, mesh):
  """(teacher config, params or None, OfflineTeacher or None): a stored teacher is never loaded."""
  if teacher_logits.enabled(ctx.cfg):
    return (teacher_logits.teacher_config(ctx.cfg, ctx.teacher), None,
            OfflineTeacher(ctx.directory, ctx.teacher, ctx.distill_steps))
  return (*load(ctx.cfg, ctx.teacher, mesh), None)


def teacher_correction_section(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The distill settings teacher correction trains with: its own optimizer, cross-entropy only."""
  section = ml_collections.ConfigDict(cfg.distill.to_dict())
  section.update(optimizer=cfg.teacher_correction.optimizer.to_dict(),
                 loss=dict(LossConfig.cross_entropy_only().__dict__))
  return section


def run_teacher_correction(ctx: Context) -> dict:
  """Follow-up paper (2408.11796): fine-tune the teacher briefly on the distillation data."""
  cfg, out = ctx.cfg, ctx.directory / "teacher_correction"
  started = time.perf_counter()
  section = cfg.teacher_correction
  config, params = load(cfg, ModelRef(), mesh_of(cfg))
  corrected_section = teacher_correction_section(cfg)
  ctx.log(f"[teacher_correction] {section.steps} cross-entropy steps on the original model")
  trained, final = _retrain(cfg, corrected_section, config, params, config, params, out,
                            section.steps, ctx.log, label="teacher_correction")
  checkpoint.save_model(out / "model", config.replace(dtype="float32", remat="none"),
                        distributed.to_host(trained))
  summary = dict(steps=section.steps, **final, seconds=time.perf_counter() - started)
  write_json(out / "summary.json", summary)
  return summary


def run_distill(ctx: Context) -> dict:
  """Retrains the pruned student (directory/prune/model) from ctx.teacher."""
  cfg, out = ctx.cfg, ctx.directory / "distill"
  started = time.perf_counter()
  section = cfg.distill
  steps = ctx.distill_steps or section.steps
  mesh = mesh_of(cfg)
  teacher_config, teacher, offline = _teacher(ctx, mesh)
  student_config, student = load(cfg, ModelRef(ctx.directory / "prune" / "model", "pruned"), mesh)
  ctx.log(f"[distill] {steps} steps of {section.batch_size}x{section.seq_len} tokens; student "
          f"{student_config.num_params():,}, teacher ({ctx.teacher.label}"
          f"{', stored top-k' if offline else ''}) {teacher_config.num_params():,} parameters")
  trained, final = _retrain(cfg, section, student_config, student, teacher_config, teacher, out,
                            steps, ctx.log, offline=offline)
  trained = distributed.to_host(trained)
  saved_config = student_config.replace(dtype="float32", remat="none")
  checkpoint.save_model(out / "model", saved_config, trained)
  hf.save(out / "hf", saved_config, trained, dtype=cfg.export_dtype)
  summary = dict(steps=steps, student_params=student_config.num_params(), **final,
                 seconds=time.perf_counter() - started)
  write_json(out / "summary.json", summary)
  ctx.log(f"[distill] done in {summary['seconds']:.1f}s: validation loss {final['val_ce']:.4f}; "
          f"model in {out / 'model'}, Hugging Face export in {out / 'hf'}")
  return summary


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


def run_search(ctx: Context) -> dict:
  """Paper §3: prune every feasible candidate, distil each briefly, keep the best."""
  cfg, out = ctx.cfg, ctx.directory / "search"
  started = time.perf_counter()
  section = cfg.search
  mesh = mesh_of(cfg)
  config, params = load(cfg, ctx.source, mesh)
  teacher_config, teacher, offline = _teacher(ctx, mesh)
  host_params = distributed.to_host(params)
  scores = importance.Scores.load(ctx.directory / "importance")
  candidates = search_candidates(cfg, config)
  score = search_score.parse(section)
  before = score is not None and score.before_retraining
  eval_steps = (0,) if before else tuple(section.eval_steps)
  ctx.log(f"[search] {len(candidates)} candidates within {section.space.tolerance:.0%} of "
          f"{search_space(cfg).describe()}; "
          f"{'no retraining' if before else f'{section.retrain_steps} steps each'}"
          f"{'' if score is None else f', ranked by {score.name}'}")
  # Saved evaluations of another ranking are not reused: each score has its own progress file.
  progress = out / ("progress.json" if score is None else f"progress.{score.slug}.json")
  done = json.loads(progress.read_text()) if progress.exists() else {}
  out.mkdir(parents=True, exist_ok=True)
  score_of = None if score is None else search_score.scorer(cfg, out, mesh)
  tok = load_tokenizer(cfg, config.vocab_size)

  def evaluate(candidate) -> dict[int, float]:
    ctx.log(f"[search] candidate {candidate.name}: {candidate.num_params:,} parameters")
    pruned_config, pruned = prune.prune(config, host_params, scores, candidate.target,
                                        **prune_options(cfg))
    pruned = sharding.shard_params(pruned_config, pruned, mesh)
    if before:  # Model Optimizer's way: score the pruned candidate as it is
      loss = importance.lm_loss(pruned_config, pruned, validation(cfg, config.vocab_size))
      return {0: loss}, score_of(pruned_config, pruned, tok)
    run_dir = out / "candidates" / candidate.name
    trained, _ = _retrain(cfg, cfg.distill, pruned_config, pruned, teacher_config, teacher,
                          run_dir, section.retrain_steps, ctx.log, eval_steps=section.eval_steps,
                          checkpoint_every=section.retrain_steps,
                          label=f"search {candidate.name}", offline=offline)
    distributed.barrier(f"searched {candidate.name}")  # the primary wrote metrics.jsonl
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["val_ce"] for r in records if "val_ce" in r}
    losses = {s: losses[s] for s in section.eval_steps}
    if score_of is None:
      return losses
    student_config = retrain_settings(cfg, cfg.distill, pruned_config, teacher_config,
                                      section.retrain_steps).student_config
    return losses, score_of(student_config, trained, tok)

  def save_progress(candidate, losses) -> None:  # a killed search resumes after this candidate
    done[candidate.name] = losses
    write_json(progress, done)
    if preemption.requested_anywhere():  # SIGTERM came between two candidates' training loops
      raise preemption.Preempted(f"[search] stopped by SIGTERM after candidate {candidate.name}; "
                                 f"progress saved in {progress}; run the same command again to "
                                 "resume")

  with preemption.watch():
    result = search.run_search(candidates, evaluate, eval_steps, done=dict(done),
                               on_result=save_progress,
                               score_name=None if score is None else score.name, log=ctx.log)
  atomic.write_text(out / "report.md", result.to_markdown())
  atomic.write_text(out / "result.json", result.to_json())
  ctx.log(f"[search] best {result.best.name} ({result.best.num_params:,} parameters) in "
          f"{time.perf_counter() - started:.0f}s; table in {out / 'report.md'}")
  return {"best": result.best.name, "seconds": time.perf_counter() - started}
