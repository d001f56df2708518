"""What every stage reads: the run's `Plan` (its settings worked out once, typed: plan.py builds
it), the models a stage starts from (`ModelRef`), the compression stage it belongs to
(`CompressionStep`) and its `Context`, with the model, tokenizer and batches every stage loads.

Below the stages: every stage module builds on it, so no stage imports another for these helpers.
"""

from __future__ import annotations

import dataclasses
import itertools
import pathlib
from typing import Any, Callable, Mapping

from minitron_jax.checkpoints import build, checkpoint, converted
from minitron_jax.compress import search
from minitron_jax.errors import ConfigError
from minitron_jax.inputs import data, tokenizer
from minitron_jax.models import partitioning, sharding
from minitron_jax.run import registry


@dataclasses.dataclass(frozen=True)
class ModelRef:
  """`path` None: the model the plan's `model` source describes; else a directory `checkpoint`
  saved."""

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
class Plan:
  """A run worked out once, before anything computes: where it works, which stages run, the mesh,
  where the original model comes from, the tokenizer, the data stream and validation batches
  every stage reports on, the export dtype, the compression stages, and each stage's own
  settings (`settings[name]`, the frozen object plan.py's parser for it built; a read-only
  mapping)."""

  workdir: pathlib.Path
  stages: tuple[str, ...]
  mesh: partitioning.MeshConfig
  model: build.ModelSource
  tokenizer: str  # "bytes", a tokenizer.json path, or "" for the model's own
  data: data.DataConfig
  eval_batches: int
  export_dtype: str
  compression: tuple[CompressionStep, ...]
  settings: Mapping[str, Any]

  @property
  def param_dtype(self) -> str:
    """The dtype of the params every stage trains and saves (a checkpoint read in another is
    cast to it where it is trained or pruned)."""
    return build.model_config(self.model).param_dtype

  def runs(self, stage: str) -> bool:
    return stage in self.stages

  def settings_of(self, stage: str) -> Any:
    if stage not in self.settings:
      raise KeyError(f"the plan has no settings for stage {stage!r}; it has {sorted(self.settings)}")
    return self.settings[stage]

  @property
  def original(self) -> ModelRef:
    """The model compression starts from: the corrected teacher when correction is a stage."""
    if self.runs("teacher_correction"):
      return ModelRef(registry.path(self.workdir, "teacher_correction", "model"),
                      "corrected teacher")
    return ModelRef(None, "original")

  def produced(self, step: CompressionStep) -> ModelRef:
    """The model a compression stage leaves for the next one."""
    kind = "distill" if self.runs("distill") else "prune"
    return ModelRef(registry.path(step.directory, kind, "model"), f"{step.name or 'stage'} {kind}")

  def models(self) -> dict[str, ModelRef]:
    """Every model the run can produce, by label, in order: the teacher, then each stage's pruned
    and distilled students (callers skip those not saved yet)."""
    refs = {"teacher": self.original}
    for step in self.compression:
      for kind, label in (("prune", "pruned"), ("distill", "distilled")):
        refs[f"{step.prefix}{label}"] = ModelRef(registry.path(step.directory, kind, "model"),
                                                  f"{step.prefix}{label}")
    return refs

  def model_config(self, ref: ModelRef):
    """The architecture of a model reference, read without its weights."""
    if ref.path is None:
      return build.model_config(self.model)
    return checkpoint.load_config(ref.path)

  def load_tokenizer(self, vocab_size: int) -> tokenizer.Tokenizer:
    spec = self.tokenizer or self.model.hf_path
    if not spec:
      raise ConfigError("config.tokenizer is empty and there is no model.hf_path to read "
                        "tokenizer.json from; set tokenizer='bytes' or a tokenizer path")
    tok = tokenizer.load_tokenizer(spec)
    if tok.vocab_size > vocab_size:
      raise ConfigError(f"tokenizer {tok.name} has {tok.vocab_size} tokens; the model's "
                        f"vocab_size={vocab_size} is smaller")
    return tok

  def validation(self, vocab_size: int) -> list:
    """The fixed validation batches every stage reports its loss on."""
    return data.validation_batches(self.data, self.load_tokenizer(vocab_size), self.eval_batches)

  def calibration(self, calibration, vocab_size: int) -> list:
    """The calibration batches of `calibration` (stage_settings.Calibration)."""
    iterator = data.make_iterator(calibration.data, self.load_tokenizer(vocab_size), "train")
    return list(itertools.islice(iterator, calibration.num_batches))


@dataclasses.dataclass(frozen=True)
class Context:
  """What one stage runs with: the run's plan, the stage, the directory it runs in, the mesh every
  stage computes on (built once by the pipeline), the models it starts from and learns from, and
  the compression stage it belongs to (None for a stage run once per run)."""

  plan: Plan
  stage: str
  directory: pathlib.Path
  mesh: Any = None
  source: ModelRef = ModelRef()
  teacher: ModelRef = ModelRef()
  step: CompressionStep | None = None
  log: Callable[[str], None] = print

  @property
  def settings(self) -> Any:
    """This stage's own settings in the plan."""
    return self.plan.settings_of(self.stage)

  @property
  def target(self) -> Mapping[str, Any] | None:
    return None if self.step is None else self.step.target

  @property
  def distill_steps(self) -> int | None:
    return None if self.step is None else self.step.distill_steps

  def load(self, ref: ModelRef, dtype: str | None = None):
    """(config, params placed on the mesh) of a model reference, in the dtype it is stored in
    (a bfloat16 checkpoint stays bfloat16: the model computes in its compute dtype whatever the
    params' dtype, exactly) or in `dtype` (a stage that trains them asks for the plan's
    `param_dtype`)."""
    return load(self.plan.model, ref, self.mesh, workdir=self.plan.workdir, dtype=dtype,
                log=self.log)


def load(source: build.ModelSource, ref: ModelRef, mesh, *, workdir: pathlib.Path | None = None,
         dtype: str | None = None, log: Callable[[str], None] = print):
  """(config, params placed on the mesh) of a model reference: `source` when `ref.path` is None
  (a checkpoint read once into its copy in `workdir`, then restored from it), else the saved
  model, computing as `source` says; in `dtype` when given."""
  shardings = lambda config: sharding.param_shardings(config, mesh)  # noqa: E731
  if ref.path is None and source.hf_path and workdir is not None:
    config, params = converted.load(source.hf_path, registry.original_copy(workdir), shardings,
                                    log)
  elif ref.path is None:
    config, params = build.load_model(source, out_shardings=shardings(build.model_config(source)))
  elif not checkpoint.is_saved_model(ref.path):
    raise ConfigError(f"no saved model at {ref.path}; run the stage that produces it")
  else:
    config = checkpoint.load_config(ref.path)
    params = checkpoint.load_model(ref.path, shardings(config))[1]
  config = config.replace(**source.compute)  # how to compute is this run's
  if dtype is not None and dtype != config.param_dtype:
    config, params = config.replace(param_dtype=dtype), sharding.cast_params(params, dtype)
  return config, params


def searched_target(directory: pathlib.Path) -> dict | None:
  """The target of the search's pick in a compression stage's directory; None before a search
  ran there. The prune stage prunes to it, and validation checks the shape it makes."""
  result = registry.path(directory, "search", "result")
  if not result.exists():
    return None
  return dict(search.SearchResult.from_json(result.read_text()).best.target)
