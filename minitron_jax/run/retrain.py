"""A pruned student's retraining, as the distill, search and teacher-correction stages run it:
distillation from the loaded teacher, or from the stored one (teacher_logits_inputs.py) when the
teacher_logits stage is in the run.
"""

from __future__ import annotations

import dataclasses
import pathlib

from minitron_jax.inputs import data
from minitron_jax.models import partitioning
from minitron_jax.run import teacher_logits_inputs
from minitron_jax.run.stage_context import Context, ModelRef
from minitron_jax.run.stage_settings import RetrainSettings
from minitron_jax.training import distill, loop


@dataclasses.dataclass(frozen=True)
class OfflineTeacher:
  """Where a compression stage's teacher store is, and which teacher it must hold."""

  directory: pathlib.Path
  teacher: ModelRef
  distill_steps: int | None


def teacher_for(ctx: Context, loaded: tuple[ModelRef, object, object] | None = None):
  """(teacher config, params or None, OfflineTeacher or None): a stored teacher is never loaded,
  nor one the stage already holds (`loaded`: its reference, config and params)."""
  if ctx.plan.runs(teacher_logits_inputs.STAGE):
    return (teacher_logits_inputs.teacher_config(ctx.plan, ctx.teacher), None,
            OfflineTeacher(ctx.directory, ctx.teacher, ctx.distill_steps))
  if loaded is not None and loaded[0] == ctx.teacher:
    return (*loaded[1:], None)
  return (*ctx.load(ctx.teacher), None)


def retrain(ctx: Context, run: RetrainSettings, student, teacher, out: pathlib.Path, *,
            label: str = "distill", offline: OfflineTeacher | None = None):
  """Distils `student` from `teacher` (or the stored one) as `run` says (Retraining.for_models
  built and checked it), on the run's mesh; (trained params, final metrics)."""
  plan, mesh = ctx.plan, ctx.mesh
  distiller = distill.Distiller(run.student_config, run.teacher_config, run.losses, run.optimizer,
                                run.loop.steps, skip_non_finite=run.loop.max_bad_steps > 0,
                                offline_teacher=offline is not None)
  if offline is not None:
    train_batches, validation_batches = teacher_logits_inputs.retrain_inputs(
        plan, offline.directory, offline.teacher, run.teacher_config, run.data.batch_size,
        run.loop.steps, offline.distill_steps)
  else:
    tok = plan.load_tokenizer(run.student_config.vocab_size)
    train_batches = data.make_iterator(run.data, tok, "train")
    validation_batches = plan.validation(run.student_config.vocab_size)
  return loop.train(distiller, student, teacher, train_batches, validation_batches, run.loop,
                    out, batch_sharding=lambda shape: partitioning.batch_sharding(mesh, shape),
                    log=ctx.log, label=label)
