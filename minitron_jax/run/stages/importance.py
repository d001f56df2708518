"""The `importance` stage: activation statistics of the source model on the calibration set
(its settings: stage_settings.Calibration).
"""

from __future__ import annotations

import time

from minitron_jax.compress import importance
from minitron_jax.models import partitioning
from minitron_jax.run import registry
from minitron_jax.run.stage_context import Context
from minitron_jax.run.stage_settings import Calibration


def run(ctx: Context, out: registry.Outputs) -> dict:
  settings: Calibration = ctx.settings
  started = time.perf_counter()
  mesh = ctx.mesh
  config, params = ctx.load(ctx.source)
  batches = ctx.plan.calibration(settings, config.vocab_size)
  ctx.log(f"[importance] {len(batches) * settings.data.batch_size} calibration samples of "
          f"{settings.data.seq_len} tokens, {config.num_params():,}-parameter {ctx.source.label} "
          "model")
  scores = importance.estimate(
      config, params, batches, batch_sharding=lambda shape: partitioning.batch_sharding(mesh, shape),
      log=ctx.log, **settings.estimate.options())
  scores.save(out.staging)
  ctx.log(f"[importance] done in {time.perf_counter() - started:.1f}s; scores in {out.final()}")
  return scores.summary()
