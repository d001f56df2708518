"""What every stage reads: the models it starts from (`ModelRef`), its `Context`, and the mesh,
models, data settings, tokenizer and validation batches of a run's config.

Below the stages: every stage module builds on it, so no stage imports another for these helpers.
The compression plan (which compression stages run, in which directories, from which teacher)
and the models a run can produce are stated here too.
"""

from __future__ import annotations

import dataclasses
import itertools
import pathlib
from typing import Any, Callable, Mapping

import ml_collections

from minitron_jax.checkpoints import build, checkpoint
from minitron_jax.compress import search
from minitron_jax.inputs import data, tokenizer
from minitron_jax.models import partitioning, sharding
from minitron_jax.errors import ConfigError
from minitron_jax.run import registry


@dataclasses.dataclass(frozen=True)
class ModelRef:
  """`path` None: the model `config.model` describes; else a directory `checkpoint` saved."""

  path: pathlib.Path | None = None
  label: str = "original"


@dataclasses.dataclass(frozen=True)
class CompressionStep:
  """One compression stage of the plan: its name ("" when the run has one, unnamed, working in
  the workdir itself), its directory, its target, its teacher ("original": the model compression
  starts from; "previous": the student the stage before produced) and its distillation steps
  (None: distill.steps)."""

  name: str
  directory: pathlib.Path
  target: Mapping[str, Any]
  teacher: str = "original"
  distill_steps: int | None = None

  @property
  def prefix(self) -> str:
    """The stage's name and a space, to put before a label; "" for the unnamed one."""
    return f"{self.name} " if self.name else ""

  def key(self, stage: str) -> str:
    """`stage` of this compression stage, as timings and logs name it."""
    return f"{self.name}/{stage}" if self.name else stage


@dataclasses.dataclass(frozen=True)
class Context:
  """What a stage runs with: the run's settings, the directory it runs in, the mesh every stage
  computes on (built once by the pipeline), the models it starts from and learns from, and the
  compression stage it belongs to (None for a stage run once per run)."""

  cfg: ml_collections.ConfigDict
  directory: pathlib.Path
  mesh: Any = None
  source: ModelRef = ModelRef()
  teacher: ModelRef = ModelRef()
  step: CompressionStep | None = None
  log: Callable[[str], None] = print

  @property
  def target(self) -> Mapping[str, Any] | None:
    return None if self.step is None else self.step.target

  @property
  def distill_steps(self) -> int | None:
    return None if self.step is None else self.step.distill_steps


def mesh_of(cfg: ml_collections.ConfigDict):
  return partitioning.make_mesh(partitioning.MeshConfig(**cfg.mesh))


def load(cfg: ml_collections.ConfigDict, ref: ModelRef, mesh):
  """(config, params placed on the mesh) of a model reference."""
  if ref.path is None:
    model_config = build.model_config(cfg.model)
    config, params = build.load_model(
        cfg.model, out_shardings=sharding.param_shardings(model_config, mesh))
    return config, sharding.shard_params(config, params, mesh)
  if not checkpoint.is_saved_model(ref.path):
    raise ConfigError(f"no saved model at {ref.path}; run the stage that produces it")
  compute = build.compute_options(cfg.model)
  config = checkpoint.load_config(ref.path).replace(**compute)  # how to compute is this run's
  return config, checkpoint.load_model(ref.path, sharding.param_shardings(config, mesh))[1]


def data_config(cfg: ml_collections.ConfigDict, **changes) -> data.DataConfig:
  return data.DataConfig.from_dict({**cfg.data.to_dict(), **changes})


def load_tokenizer(cfg: ml_collections.ConfigDict, vocab_size: int):
  spec = cfg.tokenizer or cfg.model.hf_path
  if not spec:
    raise ConfigError("config.tokenizer is empty and there is no model.hf_path to read "
                      "tokenizer.json from; set tokenizer='bytes' or a tokenizer path")
  tok = tokenizer.load_tokenizer(spec)
  if tok.vocab_size > vocab_size:
    raise ConfigError(f"tokenizer {tok.name} has {tok.vocab_size} tokens; the model's "
                      f"vocab_size={vocab_size} is smaller")
  return tok


def validation(cfg: ml_collections.ConfigDict, vocab_size: int) -> list:
  """The fixed validation batches every stage reports its loss on."""
  return data.validation_batches(data_config(cfg), load_tokenizer(cfg, vocab_size),
                                 cfg.eval_batches)


# ----------------------------------------------------------------------------- the plan


TEACHER_CHOICES = ("original", "previous")


def compression_plan(cfg: ml_collections.ConfigDict,
                     workdir: pathlib.Path) -> tuple[CompressionStep, ...]:
  """The compression stages `config.compression` lists (one, unnamed, in the workdir, with
  `config.prune.target`, when it lists none)."""
  entries = list(cfg.get("compression", ()) or ())
  if not entries:
    return (CompressionStep("", workdir, dict(cfg.prune.target)),)
  plan = []
  for index, entry in enumerate(entries):
    entry = dict(entry)
    name = entry.get("name") or f"stage{index + 1}"
    teacher = entry.get("teacher", "original")
    if teacher not in TEACHER_CHOICES:
      raise ConfigError(f"compression stage {name!r} teacher={teacher!r} is not allowed; "
                        f"allowed: {TEACHER_CHOICES}")
    plan.append(CompressionStep(name, workdir / f"{index + 1}_{name}",
                                dict(entry.get("target", {})), teacher,
                                entry.get("distill_steps")))
  return tuple(plan)


def models_of(cfg: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict[str, ModelRef]:
  """Every model the run can produce, by label, in order: the teacher, then each stage's pruned
  and distilled students (callers skip those not saved yet)."""
  original = original_ref(cfg, workdir)
  refs = {"teacher": original}
  for step in compression_plan(cfg, workdir):
    for kind in ("prune", "distill"):
      path = registry.path(step.directory, kind, "model")
      label = f"{step.prefix}{'pruned' if kind == 'prune' else 'distilled'}"
      refs[label] = ModelRef(path, label)
  return refs


def searched_target(directory: pathlib.Path) -> dict | None:
  """The target of the search's pick in a compression stage's directory; None before a search
  ran there. The prune stage prunes to it, and validation checks the shape it makes."""
  result = registry.path(directory, "search", "result")
  if not result.exists():
    return None
  return dict(search.SearchResult.from_json(result.read_text()).best.target)


def original_ref(cfg, workdir: pathlib.Path) -> ModelRef:
  """The model compression starts from: the corrected teacher when correction is a stage."""
  if "teacher_correction" in cfg.stages:
    return ModelRef(registry.path(workdir, "teacher_correction", "model"), "corrected teacher")
  return ModelRef(None, "original")


def calibration(cfg: ml_collections.ConfigDict, vocab_size: int) -> list:
  section = cfg.importance
  batches = -(-section.num_samples // section.batch_size)
  iterator = data.make_iterator(
      data_config(cfg, seq_len=section.seq_len, batch_size=section.batch_size),
      load_tokenizer(cfg, vocab_size), "train")
  return list(itertools.islice(iterator, batches))
