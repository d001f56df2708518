"""Whole-run validation: every setting is checked before the first stage computes or writes.

A mistake in a late stage's settings must not cost the hours of the stages before it, so
`checked_plan` parses the run's plan (plan.py: every section, each stage's settings) and then
checks it against what the stages will meet, without computing: the source architecture (from
`config.json` / GGUF metadata; no weight is read), every compression stage's target against the
shape it will prune (multi-stage plans, iterative rounds and search candidates included, as the
prune stage's own `planned_shape` works them out), every retraining against the architectures it
trains, the data, tokenizer, export and mesh, the files they name, and each stage's own checks
(its module's `check(plan)`). It calls the checks the library itself makes when a stage runs, so
the two cannot disagree. A stage whose output already exists is judged by that output.
"""

from __future__ import annotations

import math
import pathlib

import jax
import ml_collections

from minitron_jax.checkpoints import build, checkpoint, hf
from minitron_jax.compress import importance
from minitron_jax.inputs import data
from minitron_jax.models import partitioning
from minitron_jax.models.config import ModelConfig
from minitron_jax.run import plan as plan_lib, registry, stage_context, stages
from minitron_jax.run import teacher_logits_inputs
from minitron_jax.run.problems import Problems
from minitron_jax.run.stages import prune as prune_stage
from minitron_jax.training import teacher_logits_store


def validate(cfg: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> list[str]:
  """Every problem found, one line each, naming the setting, the bad value and what is allowed
  (stage names against registry.py first)."""
  return checked_plan(cfg, workdir)[1]


def checked_plan(cfg: ml_collections.ConfigDict, workdir: str | pathlib.Path
                 ) -> tuple[stage_context.Plan, list[str]]:
  """(the run's plan, every problem found): the plan is sound only when there is none."""
  return _Validation(cfg, pathlib.Path(workdir).absolute()).run()


class _Validation:

  def __init__(self, cfg: ml_collections.ConfigDict, workdir: pathlib.Path):
    self.cfg, self.workdir = cfg, workdir
    self.problems = Problems()
    self.attempt, self.note = self.problems.attempt, self.problems.note

  def run(self) -> tuple[stage_context.Plan, list[str]]:
    unknown = [name for name in self.cfg.stages if name not in registry.BY_NAME]
    if unknown:
      self.problems.lines.append(f"stages {unknown} are unknown; allowed: {list(registry.NAMES)}")
    source = self.model()
    # The mesh first: the plan parses it too (the same problem is noted once).
    mesh = self.attempt("mesh", plan_lib.settings, partitioning.MeshConfig,
                        self.cfg.mesh.to_dict(), "mesh")
    if mesh is not None:
      self.attempt("mesh", mesh.shape, jax.device_count())
    plan = plan_lib.build_plan(self.cfg, self.workdir, self.problems)
    if plan.data is not None:
      self.attempt("data", data.check_source, plan.data)
    # Without the model's vocabulary, only that the tokenizer loads.
    self.attempt("tokenizer", plan.load_tokenizer,
                 source.vocab_size if source is not None else math.inf)
    if source is not None and set(plan.stages) & {"check", "prune", "distill"}:
      self.attempt("model", hf.config_to_hf, source, plan.export_dtype)
    if source is not None:
      self.retraining(plan, source)
    if source is not None and plan.compression and set(plan.stages) & set(
        registry.COMPRESSION_STAGES):
      self.compression(plan, source)
    if plan.compression and plan.settings.get(teacher_logits_inputs.STAGE) is not None:
      self.teacher_logits_store(plan, plan.compression[0])
    for name in registry.NAMES:  # the checks each stage makes of its own settings
      if plan.runs(name):
        self.problems.extend(stages.problems(name, plan))
    return plan, self.problems.lines

  # --------------------------------------------------------------------------- the source

  def model(self) -> ModelConfig | None:
    """The source architecture, from the plan's model source (read before the plan, so that a
    missing checkpoint is the first problem named)."""
    model = build.ModelSource.of(self.cfg.model)
    path = model.hf_path
    if model.require_checkpoint and not path:
      # The preset need not be the checkpoint's architecture: no shape can be checked.
      self.note("model", build.missing_checkpoint(model))
      return None
    source = self.attempt("model.hf_path" if path else "model", build.model_config, model)
    if source is not None and path and pathlib.Path(path).is_dir():
      self.attempt("model.hf_path", hf.safetensors_files, path)  # headers only
    if source is not None:
      source = self.attempt("model", source.replace, **model.compute)
    # A kernel this backend lacks fails at lowering, after the earlier stages have run.
    attention = model.compute.get("attention")
    needs = {"cudnn": "gpu", "tokamax": "gpu", "splash": "tpu"}.get(attention)
    if needs and jax.default_backend() != needs:
      self.note("model.attention", f"{attention!r} needs a {needs.upper()}; this backend "
                f"is {jax.default_backend()} (allowed here: 'auto', 'naive', 'blockwise')")
    return source

  def retraining(self, plan: stage_context.Plan, source: ModelConfig) -> None:
    """Each training loop on the source shape; `compression` checks them on every pruned one."""
    offline = plan.runs(teacher_logits_inputs.STAGE)
    for name in ("distill", "search", "teacher_correction"):
      settings = plan.settings.get(name)
      retraining = settings.retraining if name == "search" and settings else settings
      if retraining is not None:
        self.attempt(name, retraining.for_models, source, source,
                     offline=offline and name != "teacher_correction")

  def teacher_logits_store(self, plan: stage_context.Plan,
                           step: stage_context.CompressionStep) -> None:
    """A first stage's teacher store written by an earlier run must suit this one (later stages'
    teachers exist only once the run reaches them; they are checked there)."""
    if step.teacher != "original":
      return
    ref = plan.original
    if ref.path is not None and not checkpoint.is_saved_model(ref.path):
      return
    config = self.attempt("model", teacher_logits_inputs.teacher_config, plan, ref)
    for split in ("train", "validation"):
      stored_path = registry.path(step.directory, teacher_logits_inputs.STAGE, split)
      if config is None or not (stored_path / "metadata.json").is_file():
        continue
      expected = self.attempt("teacher_logits", teacher_logits_inputs.expected_metadata, plan,
                              ref, config, split, step.distill_steps)
      stored = self.attempt(str(stored_path), teacher_logits_store.StoreMetadata.load, stored_path)
      if expected is not None and stored is not None:
        self.attempt(str(stored_path), stored.check_matches, expected, expected.num_rows)

  # --------------------------------------------------------------------------- the compression

  def compression(self, plan: stage_context.Plan, source: ModelConfig) -> None:
    """Walks the compression stages in order with every shape each can start from."""
    distill = plan.settings.get("distill")
    offline = plan.runs(teacher_logits_inputs.STAGE)
    students = [source]  # the shapes this stage may start from (several after a search)
    for index, step in enumerate(plan.compression):
      where = f"compression[{index}] ({step.name})" if step.name else "prune.target"
      teachers = [source] if step.teacher == "original" else students
      produced: dict[ModelConfig, None] = {}
      for student in students:
        for shape in self.stage_outputs(plan, where, step, student, teachers):
          produced[shape] = None
      if distill is not None and distill.loop is not None:  # else its problem is noted
        retraining = self.attempt("distill", distill.with_steps,
                                  step.distill_steps or distill.steps)
        for shape in produced if retraining is not None else ():
          for teacher in teachers:
            self.attempt("distill", retraining.for_models, shape, teacher, offline=offline)
      students = list(produced)
      if not students:
        return  # later stages' shapes are unknown; their problems show once this one is fixed

  def stage_outputs(self, plan: stage_context.Plan, where: str,
                    step: stage_context.CompressionStep, source: ModelConfig,
                    teachers: list[ModelConfig]) -> list[ModelConfig]:
    """The shapes one compression stage can produce from `source`, after checking its settings."""
    directory = step.directory
    saved = registry.path(directory, "prune", "model")
    if checkpoint.is_saved_model(saved):  # pruned on an earlier run; its shape is what it is
      config = self.attempt(str(saved), checkpoint.load_config, saved)
      return [config] if config is not None else []
    calibration = plan.settings.get("importance")
    if calibration is not None:
      self.attempt("importance", importance.check_options, source,
                   **calibration.estimate.options())
    if plan.runs("search"):
      targets = self.search_targets(plan, step, source, teachers)
    elif step.target:
      targets = [step.target]
    else:
      self.note(where, "is empty; allowed: the sizes to prune to (or 'search' in stages)")
      return []
    if not plan.runs("prune"):
      if plan.runs("distill"):
        for need in registry.BY_NAME["distill"].needs:
          self.missing(directory, "distill", need, plan)
      return []
    # Iterative pruning estimates importance itself; one-shot pruning reads the stage's scores.
    settings = plan.settings.get("prune")
    if settings is None:
      return []
    if settings.iterative_rounds <= 1:
      self.missing(directory, "prune", "importance.scores", plan)
    shapes = [prune_stage.planned_shape(settings.selection, settings.estimate, source, target,
                                        self.problems, where, rounds=settings.iterative_rounds)
              for target in targets]
    return [shape for shape in shapes if shape is not None]

  def missing(self, directory: pathlib.Path, stage: str, need: str,
              plan: stage_context.Plan) -> None:
    problem = registry.missing_need(directory, stage, need, set(plan.stages))
    if problem:
      self.note("stages", problem)

  def search_targets(self, plan: stage_context.Plan, step: stage_context.CompressionStep,
                     source: ModelConfig, teachers: list[ModelConfig]) -> list[dict]:
    """Every candidate the search can pick (its pick, if it ran), its retraining checked."""
    directory = step.directory
    result = registry.path(directory, "search", "result")
    if result.exists():
      searched = self.attempt(str(result), stage_context.searched_target, directory)
      return [searched] if searched is not None else []
    self.missing(directory, "search", "importance.scores", plan)
    settings = plan.settings.get("search")
    if settings is None or settings.space is None:
      return []
    candidates = self.attempt("search.space", settings.candidates, source) or []
    offline = plan.runs(teacher_logits_inputs.STAGE)
    for candidate in candidates:
      # The search prunes each candidate in one step.
      shape = prune_stage.planned_shape(settings.selection, settings.estimate, source,
                                        candidate.target, self.problems,
                                        f"search candidate {candidate.name}")
      for teacher in teachers if shape is not None and settings.retraining else ():
        self.attempt("search", settings.retraining.for_models, shape, teacher, offline=offline)
    return [candidate.target for candidate in candidates]
