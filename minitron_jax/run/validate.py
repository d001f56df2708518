"""Whole-run validation: every setting is checked before the first stage computes or writes.

A mistake in a late stage's settings must not cost the hours of the stages before it, so
`validate` builds, without computing, what each stage will build from the config: the source
architecture (from `config.json` / GGUF metadata; no weight is read), every compression stage's
target against the shape it will prune (multi-stage plans, iterative rounds and search
candidates included), the loss, optimizer, loop, data, tokenizer, evaluation, export and mesh
settings, and the files they name. It calls the checks the library itself makes when a stage
runs, so the two cannot disagree. A stage whose output already exists is judged by that output.
"""

from __future__ import annotations

import math
import pathlib
from typing import Any, Callable

import jax
import ml_collections

from minitron_jax.checkpoints import build, checkpoint, hf
from minitron_jax.compress import importance, prune, search
from minitron_jax.inputs import data
from minitron_jax.models import config as config_lib, partitioning
from minitron_jax.run import (registry, stage_context, stage_settings, stages,
                              teacher_logits_inputs)
from minitron_jax.training import teacher_logits_store
from minitron_jax.models.config import ModelConfig
from minitron_jax.errors import ConfigError

def validate(cfg: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> list[str]:
  """Every problem found, one line each, naming the setting, the bad value and what is allowed
  (stage names against registry.py first)."""
  return _Validation(cfg, pathlib.Path(workdir).absolute()).run()


def error(problems: list[str]) -> ConfigError:
  """One ConfigError for all problems: the problem itself when there is one, else a count and
  one problem per line."""
  if len(problems) == 1:
    return ConfigError(problems[0])
  return ConfigError(f"{len(problems)} problems in the run's settings, nothing was run:\n"
                     + "\n".join(f"  {problem}" for problem in problems))


class _Validation:

  def __init__(self, cfg: ml_collections.ConfigDict, workdir: pathlib.Path):
    self.cfg, self.workdir = cfg, workdir
    self.stages = set(cfg.stages)
    self.problems: list[str] = []
    self.messages: set[str] = set()

  def attempt(self, setting: str, function: Callable, *args, **kwargs) -> Any:
    """function(*args, **kwargs), or None after noting its ConfigError under `setting`."""
    try:
      return function(*args, **kwargs)
    except ConfigError as e:
      self.note(setting, str(e))
    except (TypeError, ValueError) as e:  # a value of the wrong type reaching a constructor
      self.note(setting, f"{type(e).__name__}: {e}")
    return None

  def note(self, setting: str, message: str) -> None:
    message = " ".join(message.split("\n"))
    # One setting reached from many places (the data section in every retraining, a target
    # checked against several shapes) is reported once, under the first.
    if message not in self.messages:
      self.messages.add(message)
      self.problems.append(f"{setting}: {message}")

  def run(self) -> list[str]:
    unknown = [name for name in self.cfg.stages if name not in registry.BY_NAME]
    if unknown:
      self.problems.append(f"stages {unknown} are unknown; allowed: {list(registry.NAMES)}")
    source = self.model()
    self.mesh()
    self.general()
    self.data()
    # Without the model's vocabulary, only that the tokenizer loads.
    self.attempt("tokenizer", stage_context.load_tokenizer, self.cfg,
                 source.vocab_size if source is not None else math.inf)
    if source is not None and self.stages & {"check", "prune", "distill"}:
      self.attempt("model", hf.config_to_hf, source, self.cfg.export_dtype)
    self.retraining(source)
    plan = self.attempt("compression", stage_context.compression_plan, self.cfg, self.workdir)
    if source is not None and plan and self.stages & set(registry.COMPRESSION_STAGES):
      self.compression(source, plan)
    if plan and teacher_logits_inputs.enabled(self.cfg):
      self.teacher_logits_store(plan[0])
    for name in registry.NAMES:  # the checks each stage makes of its own settings
      if name in self.stages:
        for problem in stages.problems(name, self.cfg):
          self.note(*problem.split(": ", 1))
    return self.problems

  # --------------------------------------------------------------------------- settings

  def model(self) -> ModelConfig | None:
    section = self.cfg.model
    path = section.get("hf_path")
    if section.get("require_checkpoint") and not path:
      # The preset need not be the checkpoint's architecture: no shape can be checked.
      self.note("model", build.missing_checkpoint(section))
      return None
    source = self.attempt("model.hf_path" if path else "model", build.model_config, section)
    if source is not None and path and pathlib.Path(path).is_dir():
      self.attempt("model.hf_path", hf.safetensors_files, path)  # headers only
    if source is not None:
      compute = build.compute_options(section)
      source = self.attempt("model", source.replace, **compute)
    # A kernel this backend lacks fails at lowering, after the earlier stages have run.
    needs = {"cudnn": "gpu", "tokamax": "gpu", "splash": "tpu"}.get(section.get("attention"))
    if needs and jax.default_backend() != needs:
      self.note("model.attention", f"{section.attention!r} needs a {needs.upper()}; this backend "
                f"is {jax.default_backend()} (allowed here: 'auto', 'naive', 'blockwise')")
    return source

  def mesh(self) -> None:
    mesh = self.attempt("mesh", stage_settings.settings, partitioning.MeshConfig,
                        self.cfg.mesh.to_dict(), "mesh")
    if mesh is not None:
      self.attempt("mesh", mesh.shape, jax.device_count())

  def general(self) -> None:
    cfg = self.cfg
    if not isinstance(cfg.eval_batches, int) or cfg.eval_batches < 1:
      self.note("eval_batches", f"{cfg.eval_batches!r} must be a positive integer")
    if cfg.export_dtype not in config_lib.DTYPES:
      self.note("export_dtype", f"{cfg.export_dtype!r} is not supported; allowed: "
                f"{config_lib.DTYPES}")
    section = cfg.importance
    if "importance" in self.stages or cfg.prune.iterative_rounds > 1:
      if not isinstance(section.num_samples, int) or section.num_samples < 1:
        self.note("importance.num_samples", f"{section.num_samples!r} must be a positive integer")

  def data(self) -> None:
    cfg = self.cfg
    base = self.attempt("data", stage_context.data_config, cfg)
    if base is None:
      return
    self.attempt("data", data.check_source, base)
    if "importance" in self.stages or cfg.prune.iterative_rounds > 1:
      self.attempt("importance", stage_context.data_config, cfg, seq_len=cfg.importance.seq_len,
                   batch_size=cfg.importance.batch_size)
    # distill, search and teacher correction build their data in stage_settings.retrain_settings

  def retraining(self, source: ModelConfig | None) -> None:
    """Each training loop's settings on their own (one bad setting hides no other), then as a
    whole on the source shape when known; `compression` checks them on every pruned shape."""
    cfg = self.cfg
    runs = []
    if self.stages & {"distill", "search"}:
      self.attempt("distill.loss", stage_settings.loss_config, cfg.distill.loss)
      runs.append(("distill", cfg.distill, cfg.distill.steps, {}))
    if "search" in self.stages:
      runs.append(("search", cfg.distill, cfg.search.retrain_steps,
                   dict(eval_steps=cfg.search.eval_steps,
                        checkpoint_every=cfg.search.retrain_steps)))
    if "teacher_correction" in self.stages:
      runs.append(("teacher_correction", stage_settings.teacher_correction_section(cfg),
                   cfg.teacher_correction.steps, {}))
    for name, section, steps, loop in runs:
      optimizer = "teacher_correction" if name == "teacher_correction" else "distill"
      self.attempt(f"{optimizer}.optimizer", stage_settings.optimizer_config, section.optimizer,
                   section.batch_size)
      self.attempt(name, stage_settings.loop_config, section, steps, **loop)
      self.attempt("distill", stage_context.data_config, cfg, batch_size=section.batch_size,
                   seq_len=section.seq_len)
      if source is not None:
        offline = teacher_logits_inputs.enabled(cfg) and name != "teacher_correction"
        self.attempt(name, stage_settings.retrain_settings, cfg, section, source, source, steps, **loop,
                     offline=offline)

  def teacher_logits_store(self, step: stage_context.CompressionStep) -> None:
    """A first stage's teacher store written by an earlier run must suit this one (later stages'
    teachers exist only once the run reaches them; they are checked there)."""
    if step.teacher != "original":
      return
    ref = stage_context.original_ref(self.cfg, self.workdir)
    if ref.path is not None and not checkpoint.is_saved_model(ref.path):
      return
    config = self.attempt("model", teacher_logits_inputs.teacher_config, self.cfg, ref)
    for split in ("train", "validation"):
      stored_path = registry.path(step.directory, teacher_logits_inputs.STAGE, split)
      if config is None or not (stored_path / "metadata.json").is_file():
        continue
      expected = self.attempt("teacher_logits", teacher_logits_inputs.expected_metadata, self.cfg,
                              ref, config, split, step.distill_steps)
      stored = self.attempt(str(stored_path), teacher_logits_store.StoreMetadata.load, stored_path)
      if expected is not None and stored is not None:
        self.attempt(str(stored_path), stored.check_matches, expected, expected.num_rows)

  # --------------------------------------------------------------------------- the plan

  def compression(self, source: ModelConfig,
                  plan: tuple[stage_context.CompressionStep, ...]) -> None:
    """Walks the plan stage by stage with every shape each stage can start from."""
    students = [source]  # the shapes this stage may start from (several after a search)
    for index, step in enumerate(plan):
      where = f"compression[{index}] ({step.name})" if step.name else "prune.target"
      teachers = [source] if step.teacher == "original" else students
      produced: dict[ModelConfig, None] = {}
      for student in students:
        for shape in self.stage_outputs(where, step, student, teachers):
          produced[shape] = None
      if "distill" in self.stages:
        steps = step.distill_steps or self.cfg.distill.steps
        for shape in produced:
          for teacher in teachers:
            self.attempt("distill", stage_settings.retrain_settings, self.cfg, self.cfg.distill, shape,
                         teacher, steps, offline=teacher_logits_inputs.enabled(self.cfg))
      students = list(produced)
      if not students:
        return  # later stages' shapes are unknown; their problems show once this one is fixed

  def stage_outputs(self, where: str, step: stage_context.CompressionStep, source: ModelConfig,
                    teachers: list[ModelConfig]) -> list[ModelConfig]:
    """The shapes one compression stage can produce from `source`, after checking its settings."""
    directory = step.directory
    saved = registry.path(directory, "prune", "model")
    if checkpoint.is_saved_model(saved):  # pruned on an earlier run; its shape is what it is
      config = self.attempt(str(saved), checkpoint.load_config, saved)
      return [config] if config is not None else []
    if "importance" in self.stages:
      self.attempt("importance", importance.check_options, source,
                   **stage_settings.estimate_options(self.cfg))
    if "search" in self.stages:
      targets = self.search_targets(where, step, source, teachers)
    elif step.target:
      targets = [step.target]
    else:
      self.note(where, "is empty; allowed: the sizes to prune to (or 'search' in stages)")
      return []
    if "prune" not in self.stages:
      if "distill" in self.stages:
        for need in registry.BY_NAME["distill"].needs:
          problem = registry.missing_need(directory, "distill", need, self.stages)
          if problem:
            self.note("stages", problem)
      return []
    # Iterative pruning estimates importance itself; one-shot pruning reads the stage's scores.
    self.need_scores(directory, self.cfg.prune.iterative_rounds <= 1, "prune")
    shapes = [self.pruned_shape(where, source, target, iterative=True) for target in targets]
    return [shape for shape in shapes if shape is not None]

  def need_scores(self, directory: pathlib.Path, needed: bool, stage: str) -> None:
    problem = needed and registry.missing_need(directory, stage, "importance.scores", self.stages)
    if problem:
      self.note("stages", problem)

  def search_targets(self, where: str, step: stage_context.CompressionStep, source: ModelConfig,
                     teachers: list[ModelConfig]) -> list[dict]:
    """Every candidate the search can pick (its pick, if it ran), its retraining checked."""
    directory = step.directory
    result = registry.path(directory, "search", "result")
    if result.exists():
      searched = self.attempt(str(result), stage_context.searched_target, directory)
      return [searched] if searched is not None else []
    self.need_scores(directory, True, "search")
    section = self.cfg.search
    self.attempt("search.eval_steps", search.check_eval_steps, section.eval_steps)
    candidates = self.attempt("search.space", stage_settings.search_candidates, self.cfg, source) or []
    for candidate in candidates:
      shape = self.pruned_shape(f"search candidate {candidate.name}", source, candidate.target,
                                iterative=False)
      for teacher in teachers if shape is not None else ():
        self.attempt("search", stage_settings.retrain_settings, self.cfg, self.cfg.distill, shape,
                     teacher, section.retrain_steps, eval_steps=section.eval_steps,
                     checkpoint_every=section.retrain_steps,
                     offline=teacher_logits_inputs.enabled(self.cfg))
    return [candidate.target for candidate in candidates]

  def pruned_shape(self, where: str, source: ModelConfig, target: dict, *, iterative: bool
                   ) -> ModelConfig | None:
    """The architecture `prune` makes of `source` for `target`, if every check passes. The prune
    stage goes in `prune.iterative_rounds` rounds; the search prunes each candidate at once."""
    options = stage_settings.estimate_options(self.cfg)
    estimated = {"block_importance": options["block_sizes"],
                 "drop_loss": options["drop_block_sizes"] if options["drop_loss"] else ()}
    selection = dict(depth_criterion=self.cfg.prune.depth_criterion,
                     contiguous_depth=self.cfg.prune.contiguous_depth,
                     expert_criterion=self.cfg.prune.expert_criterion, estimated=estimated)
    rounds = self.cfg.prune.iterative_rounds
    if iterative and rounds > 1:
      targets = self.attempt("prune.iterative_rounds", prune.iterative_targets, source,
                             dict(target), rounds)
      if targets is None:
        return None
    else:
      targets = [dict(target)]
    shape = source
    for index, round_target in enumerate(targets):
      if index:  # each round estimates importance on the model the last round left
        self.attempt("importance", importance.check_options, shape, **options)
      full = self.attempt(where, prune.check_selection, shape, round_target, **selection)
      if full is None:
        return None
      shape = prune.target_config(shape, full)
    return shape
