"""Memory plans without the hardware: per-device bytes of a run's programs from abstract shapes.

A run's config says which programs it compiles (teacher correction, the importance pass, the
drop-loss pass, the distillation step) and on what mesh. Each is lowered and compiled for real
here, from `jax.ShapeDtypeStruct`s carrying the shardings the run places its arrays with, so
nothing of the model's size is ever allocated. Two kinds of numbers come out:

- parameters and optimizer state: exact per-device bytes, the sum over every leaf of its shard
  shape on one device times its item size; no compiler is involved;
- what the compiled per-device (SPMD) program holds, from XLA's memory analysis: arguments,
  outputs, temporaries, generated code, and outputs aliased to donated arguments. On a mesh of
  simulated CPU devices that is the CPU compiler's buffer assignment: an estimate of what the
  GPU or TPU build of the same program needs, whose compilers fuse, schedule and choose
  attention kernels differently.

`max_batch` finds the largest per-device batch whose compiled peak fits a memory size by
compiling (doubling, then bisection), under the same caveat.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from minitron_jax.checkpoints import build
from minitron_jax.compress import importance, prune
from minitron_jax.models import model, partitioning, sharding
from minitron_jax.run import plan as plan_lib, stage_context, stage_settings
from minitron_jax.training import distill
from minitron_jax.models.config import ModelConfig
from minitron_jax.errors import ConfigError

GIB = 1024**3
PROGRAMS = ("teacher_correction", "importance", "drop_loss", "distill")


# ----------------------------------------------------------------------------- byte counts


def shard_bytes(tree) -> int:
  """Bytes one device holds of a tree of arrays or ShapeDtypeStructs: every leaf's shard shape
  (its whole shape when it has no sharding) times its item size."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = tuple(leaf.shape)
    placed = getattr(leaf, "sharding", None)
    if placed is not None:
      shape = placed.shard_shape(shape)
    total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
  return total


@dataclasses.dataclass(frozen=True)
class StateBytes:
  """Exact per-device bytes of what a program is given besides the batch."""

  teacher_params: int = 0
  params: int = 0  # the trained student's weights; the scored model's for importance
  optimizer: int = 0  # AdamW moments and step counts
  other: int = 0  # the step counter and the hidden-state projection

  @property
  def total(self) -> int:
    return self.teacher_params + self.params + self.optimizer + self.other


@dataclasses.dataclass(frozen=True)
class CompiledMemory:
  """XLA's memory analysis of one compiled program, per device."""

  argument: int
  output: int
  temp: int
  generated_code: int
  alias: int  # output bytes written into donated argument buffers

  @classmethod
  def of(cls, compiled) -> "CompiledMemory":
    stats = compiled.memory_analysis()
    return cls(argument=int(stats.argument_size_in_bytes),
               output=int(stats.output_size_in_bytes), temp=int(stats.temp_size_in_bytes),
               generated_code=int(stats.generated_code_size_in_bytes),
               alias=int(stats.alias_size_in_bytes))

  @property
  def peak(self) -> int:
    """Bytes live while the program runs: arguments, outputs not written into donated
    arguments, temporaries. Generated code is left out: an accelerator keeps it outside HBM."""
    return self.argument + self.output - self.alias + self.temp


@dataclasses.dataclass(frozen=True)
class ProgramPlan:
  """One program compiled at one batch."""

  program: str
  global_batch: int
  # Nominal sequences per device per micro-batch: global batch / (data x fsdp x micro-batches).
  per_device_batch: float
  seq_len: int
  state: StateBytes
  memory: CompiledMemory
  compile_seconds: float


@dataclasses.dataclass(frozen=True)
class MaxBatch:
  """The largest per-device batch whose compiled peak fits `hbm_bytes` (0: not even one)."""

  program: str
  hbm_bytes: int
  per_device_batch: int
  global_batch: int
  tried: tuple[tuple[int, int], ...]  # (per-device batch, peak bytes), in the order compiled
  capped: bool  # the search reached its limit still fitting: the true maximum may be larger


# ----------------------------------------------------------------------------- programs


@dataclasses.dataclass(frozen=True)
class Program:
  """One program of a run, compilable at any batch: `lower(global_batch)` lowers it from
  abstract inputs. A per-device batch b means a global batch of b x `batch_multiple`."""

  name: str
  seq_len: int
  global_batch: int  # the config's
  batch_multiple: int  # data x fsdp, times micro-batches per step
  state: StateBytes
  lower: Callable[[int], Any]


def abstract_params(config: ModelConfig, mesh) -> dict:
  """Every weight as a ShapeDtypeStruct placed as a run places it (`sharding.param_shardings`)."""
  return jax.tree.map(
      lambda leaf, placed: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=placed),
      model.abstract_params(config), sharding.param_shardings(config, mesh))


def abstract_batch(mesh, global_batch: int, seq_len: int) -> dict:
  """tokens / segment_ids / positions as the training loop places them."""
  shape = (global_batch, seq_len)
  struct = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=partitioning.batch_sharding(mesh, shape))
  return {"tokens": struct, "segment_ids": struct, "positions": struct}


def _keys(path) -> tuple:
  return tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)


def abstract_state(distiller: distill.Distiller, student: dict, mesh) -> dict:
  """`distiller.init_state(student)` as ShapeDtypeStructs with the shardings the real state has:
  an optimizer moment is zeros_like its parameter and keeps that parameter's sharding; what
  init_state makes on one device (step counts, the projection) it replicates over the mesh."""
  shapes = jax.eval_shape(distiller.init_state,
                          jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), student))
  placed = {_keys(path): leaf.sharding
            for path, leaf in jax.tree_util.tree_leaves_with_path({"student": student})}
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def place(path, leaf):
    keys = _keys(path)
    # A moment's path ends with its parameter's: (..., "mu", "student", "embed").
    found = next((placed[keys[i:]] for i in range(len(keys)) if keys[i:] in placed), replicated)
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=found)

  return jax.tree_util.tree_map_with_path(place, shapes)


def state_bytes(state: dict, teacher=None) -> StateBytes:
  """Per-device bytes of a train state (real or abstract) and of the teacher's params."""
  trainable = state["trainable"]
  return StateBytes(teacher_params=shard_bytes(teacher) if teacher is not None else 0,
                    params=shard_bytes(trainable["student"]),
                    optimizer=shard_bytes(state["opt_state"]),
                    other=shard_bytes(state["step"]) + shard_bytes(
                        {k: v for k, v in trainable.items() if k != "student"}))


def training_program(name: str, run: stage_settings.RetrainSettings, total_steps: int, mesh) -> Program:
  """`Distiller.train_step` of one training loop, built as `stages` builds it."""
  distiller = distill.Distiller(run.student_config, run.teacher_config, run.losses, run.optimizer,
                                total_steps, skip_non_finite=run.loop.max_bad_steps > 0)
  student = abstract_params(run.student_config, mesh)
  teacher = (abstract_params(run.teacher_config, mesh) if run.teacher_config is not None
             else None)
  state = abstract_state(distiller, student, mesh)
  seq_len = run.data.seq_len

  def lower(global_batch: int):
    with jax.set_mesh(mesh):  # as pipeline.run traces it: activations pinned to the batch axes
      return distiller.train_step.lower(state, teacher,
                                        abstract_batch(mesh, global_batch, seq_len))

  return Program(name=name, seq_len=seq_len, global_batch=run.data.batch_size,
                 batch_multiple=_data_parallel(mesh) * run.optimizer.accumulation_steps,
                 state=state_bytes(state, teacher), lower=lower)


def importance_program(config: ModelConfig, mesh, batch_size: int, seq_len: int,
                       block_sizes=(1,)) -> Program:
  """The per-batch statistics `importance.estimate` computes on the model being scored."""
  params = abstract_params(config, mesh)
  block_sizes = tuple(sorted(set(block_sizes)))

  def lower(global_batch: int):
    batch = abstract_batch(mesh, global_batch, seq_len)
    with jax.set_mesh(mesh):
      return importance._batch_statistics.lower(config, params, batch["tokens"],
                                                batch["segment_ids"], batch["positions"],
                                                block_sizes=block_sizes)

  return Program(name="importance", seq_len=seq_len, global_batch=batch_size,
                 batch_multiple=_data_parallel(mesh), state=StateBytes(params=shard_bytes(params)),
                 lower=lower)


def drop_loss_program(config: ModelConfig, mesh, batch_size: int, seq_len: int) -> Program:
  """The LM loss the drop-loss depth criterion computes (full logits) on the whole model; a
  model with a block dropped is smaller."""
  params = abstract_params(config, mesh)

  def lower(global_batch: int):
    batch = abstract_batch(mesh, global_batch, seq_len)
    with jax.set_mesh(mesh):
      return importance._lm_loss_sums_jit.lower(config, params, batch["tokens"],
                                                batch["segment_ids"], batch["positions"])

  return Program(name="drop_loss", seq_len=seq_len, global_batch=batch_size,
                 batch_multiple=_data_parallel(mesh), state=StateBytes(params=shard_bytes(params)),
                 lower=lower)


def _data_parallel(mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"] * mesh.shape.get("expert", 1)


# ----------------------------------------------------------------------------- from a config


def stage_models(cfg: ml_collections.ConfigDict, stage: int = 0
                 ) -> tuple[ModelConfig, ModelConfig, ModelConfig]:
  """(source, student, teacher) architectures of compression stage `stage` (0-based), from
  shapes alone: stage k prunes stage k-1's student, and its teacher is the original model or
  that previous student. All three compute as the model section says (dtype, remat, attention),
  as `build.load_model` applies it."""
  return _stage_models(run_plan(cfg), stage)


def _stage_models(plan: stage_context.Plan, stage: int):
  original = build.model_config(plan.model).replace(**plan.model.compute)
  steps = plan.compression
  if not isinstance(stage, int) or not 0 <= stage < len(steps):
    raise ConfigError(f"stage={stage!r} is outside the run's {len(steps)} compression stage(s); "
                      f"allowed: 0..{len(steps) - 1}")
  source = student = teacher = original
  for index, step in enumerate(steps[:stage + 1]):
    if index:
      source = student
    teacher = original if step.teacher == "original" else source
    student = prune.target_config(source, prune.validate_target(source, step.target))
  return source, student, teacher


def run_plan(cfg: ml_collections.ConfigDict) -> stage_context.Plan:
  """The run's plan, with a data source that needs no dataset: a memory plan reads no data, and
  only batch size and sequence length shape a program (a bad setting raises a ConfigError)."""
  copy = ml_collections.ConfigDict(cfg.to_dict())
  copy.data.update(source="stdlib", tfds_name="", paths=(), validation_paths=())
  return plan_lib.build_plan(copy, pathlib.Path("."))  # only the targets are read


def programs(cfg: ml_collections.ConfigDict, mesh, stage: int = 0,
             names: tuple[str, ...] = PROGRAMS) -> list[Program]:
  """The programs of `cfg.stages` that hold a model on the mesh, in run order, among `names`:
  teacher correction (first stage only), importance, drop-loss (when the config asks for it)
  and distillation (which search retraining shares, at its candidates' sizes)."""
  unknown = sorted(set(names) - set(PROGRAMS))
  if unknown:
    raise ConfigError(f"programs {unknown} are unknown; allowed: {list(PROGRAMS)}")
  plan = run_plan(cfg)
  source, student, teacher = _stage_models(plan, stage)
  out = []
  if "teacher_correction" in names and plan.runs("teacher_correction") and stage == 0:
    correction = plan.settings_of("teacher_correction")
    out.append(training_program("teacher_correction", correction.for_models(source, source),
                                correction.steps, mesh))
  calibration = plan.settings.get("importance")
  if calibration is not None:
    stream, estimate = calibration.data, calibration.estimate
    if "importance" in names:
      out.append(importance_program(source, mesh, stream.batch_size, stream.seq_len,
                                    estimate.block_sizes))
    if "drop_loss" in names and estimate.drop_loss:
      out.append(drop_loss_program(source, mesh, stream.batch_size, stream.seq_len))
  retraining = distill_retraining(plan)
  if "distill" in names and retraining is not None:
    out.append(training_program("distill", retraining.for_models(student, teacher),
                                retraining.steps, mesh))
  return out


def distill_retraining(plan: stage_context.Plan):
  """Distillation's settings, or the search's retraining (the same loss, optimizer and batch)
  when only the search runs; None when neither does."""
  if plan.runs("distill"):
    return plan.settings_of("distill")
  if plan.runs("search"):
    return plan.settings_of("search").retraining
  return None


# ----------------------------------------------------------------------------- measuring


def measure(program: Program, global_batch: int | None = None) -> ProgramPlan:
  """Compiles `program` at `global_batch` (the config's when None) and reads its memory."""
  global_batch = global_batch or program.global_batch
  started = time.perf_counter()
  compiled = program.lower(global_batch).compile()
  return ProgramPlan(program=program.name, global_batch=global_batch,
                     per_device_batch=global_batch / program.batch_multiple,
                     seq_len=program.seq_len, state=program.state,
                     memory=CompiledMemory.of(compiled),
                     compile_seconds=time.perf_counter() - started)


def max_batch(program: Program, hbm_bytes: int, limit: int = 1024,
              log: Callable[[str], None] | None = None) -> MaxBatch:
  """The largest per-device batch b (global b x batch_multiple) whose compiled peak is at most
  `hbm_bytes`. Compiles b = 1, 2, 4, ... up to `limit` until one does not fit, then bisects, so
  b fits and b + 1 was compiled and does not (the peak grows with the batch)."""
  if not hbm_bytes > 0 or not (isinstance(limit, int) and limit >= 1):
    raise ConfigError(f"hbm_bytes={hbm_bytes} and limit={limit!r} must be positive")
  log = log or (lambda message: None)
  peaks: dict[int, int] = {}

  def fits(b: int) -> bool:
    if b not in peaks:
      plan = measure(program, b * program.batch_multiple)
      peaks[b] = plan.memory.peak
      log(f"[plan] {program.name}: per-device batch {b}: peak {plan.memory.peak / GIB:,.2f} GiB, "
          f"{'fits' if peaks[b] <= hbm_bytes else 'does not fit'} ({plan.compile_seconds:.1f}s)")
    return peaks[b] <= hbm_bytes

  low, high, b = 0, limit + 1, 1  # low fits (0 trivially); high does not, or is past the limit
  while b <= limit:
    if not fits(b):
      high = b
      break
    low, b = b, 2 * b
  if high > limit and low < limit:  # doubling jumped past the limit: try the limit itself
    low, high = (limit, high) if fits(limit) else (low, limit)
  while high - low > 1:
    middle = (low + high) // 2
    low, high = (middle, high) if fits(middle) else (low, middle)
  return MaxBatch(program=program.name, hbm_bytes=int(hbm_bytes), per_device_batch=low,
                  global_batch=low * program.batch_multiple, tried=tuple(peaks.items()),
                  capped=high > limit)
