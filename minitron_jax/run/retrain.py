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
from minitron_jax.run.stage_context import (Context, ModelRef, load, load_tokenizer, mesh_of,
                                            validation)
from minitron_jax.run.stage_settings import retrain_settings
from minitron_jax.training import distill, loop


@dataclasses.dataclass(frozen=True)
class OfflineTeacher:
  """Where a compression stage's teacher store is, and which teacher it must hold."""

  directory: pathlib.Path
  teacher: ModelRef
  distill_steps: int | None


def teacher_for(ctx: Context, mesh):
  """(teacher config, params or None, OfflineTeacher or None): a stored teacher is never loaded."""
  if teacher_logits_inputs.enabled(ctx.cfg):
    return (teacher_logits_inputs.teacher_config(ctx.cfg, ctx.teacher), None,
            OfflineTeacher(ctx.directory, ctx.teacher, ctx.distill_steps))
  return (*load(ctx.cfg, ctx.teacher, mesh), None)


def retrain(cfg, section, student_config, student, teacher_config, teacher, out: pathlib.Path,
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
    train_batches, validation_batches = teacher_logits_inputs.retrain_inputs(
        cfg, offline.directory, offline.teacher, teacher_config, run.data.batch_size, steps,
        offline.distill_steps)
  else:
    tok = load_tokenizer(cfg, run.student_config.vocab_size)
    train_batches = data.make_iterator(run.data, tok, "train")
    validation_batches = validation(cfg, run.student_config.vocab_size)
  return loop.train(distiller, student, teacher, train_batches, validation_batches, run.loop,
                       out, batch_sharding=lambda shape: partitioning.batch_sharding(mesh, shape),
                       log=log, label=label)
