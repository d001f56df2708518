"""The `distill` stage: the pruned student retrained from the teacher (paper §4), saved as an orbax
checkpoint and a Hugging Face export.
"""

from __future__ import annotations

import time

from minitron_jax.checkpoints import checkpoint, hf
from minitron_jax.core import atomic
from minitron_jax.run import registry, retrain
from minitron_jax.run.stage_context import Context, ModelRef
from minitron_jax.run.stage_settings import Retraining


def run(ctx: Context, out: registry.Outputs) -> dict:
  """Retrains the pruned student (directory/prune/model) from ctx.teacher."""
  retraining: Retraining = ctx.settings
  plan = ctx.plan
  started = time.perf_counter()
  steps = ctx.distill_steps or retraining.steps
  teacher_config, teacher, offline = retrain.teacher_for(ctx)
  student_config, student = ctx.load(
      ModelRef(registry.path(ctx.directory, "prune", "model"), "pruned"), dtype=plan.param_dtype)
  ctx.log(f"[distill] {steps} steps of {retraining.data.batch_size}x{retraining.data.seq_len} "
          f"tokens; student "
          f"{student_config.num_params():,}, teacher ({ctx.teacher.label}"
          f"{', stored top-k' if offline else ''}) {teacher_config.num_params():,} parameters")
  settings = retraining.with_steps(steps).for_models(student_config, teacher_config,
                                                      offline=offline is not None)
  trained, final = retrain.retrain(ctx, settings, student, teacher, out.final(), offline=offline)
  # Saved as it is, sharded (each process writes its shards); the export gathers leaf by leaf.
  saved_config = student_config.replace(dtype="float32", remat="none")
  checkpoint.save_model(out.staged("model"), saved_config, trained)
  hf.save(out.staged("hf"), saved_config, trained,
          dtype=plan.export_dtype, tokenizer=plan.load_tokenizer(saved_config.vocab_size))
  summary = dict(steps=steps, student_params=student_config.num_params(), **final,
                 seconds=time.perf_counter() - started)
  atomic.write_json(out.staged("summary"), summary)
  ctx.log(f"[distill] done in {summary['seconds']:.1f}s: validation loss {final['val_ce']:.4f}; "
          f"model in {out.final('model')}, Hugging Face export in {out.final('hf')}")
  return summary
