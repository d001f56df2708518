"""The `teacher_correction` stage (2408.11796): the teacher fine-tuned briefly on the distillation
data before it teaches.
"""

from __future__ import annotations

import time

from minitron_jax.checkpoints import checkpoint
from minitron_jax.core import atomic
from minitron_jax.run import registry, retrain
from minitron_jax.run.stage_context import Context, ModelRef
from minitron_jax.run.stage_settings import Retraining


def run(ctx: Context, out: registry.Outputs) -> dict:
  """Follow-up paper (2408.11796): fine-tune the teacher briefly on the distillation data."""
  retraining: Retraining = ctx.settings  # its own optimizer, cross-entropy only
  started = time.perf_counter()
  config, params = ctx.load(ModelRef(), dtype=ctx.plan.param_dtype)  # trained: float32
  ctx.log(f"[teacher_correction] {retraining.steps} cross-entropy steps on the original model")
  settings = retraining.for_models(config, config)
  trained, final = retrain.retrain(ctx, settings, params, params, out.final(),
                                   label="teacher_correction")
  checkpoint.save_model(out.staged("model"),
                        config.replace(dtype="float32", remat="none"), trained)  # sharded
  summary = dict(steps=retraining.steps, **final, seconds=time.perf_counter() - started)
  atomic.write_json(out.staged("summary"), summary)
  return summary
