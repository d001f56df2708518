"""The `importance` stage: activation statistics of the source model on the calibration set.
"""

from __future__ import annotations

import time

from minitron_jax.compress import importance
from minitron_jax.models import partitioning
from minitron_jax.run import registry, stage_context
from minitron_jax.run.stage_context import Context, load
from minitron_jax.run.stage_settings import estimate_options


def run(ctx: Context, out: registry.Outputs) -> dict:
  cfg = ctx.cfg
  started = time.perf_counter()
  mesh = ctx.mesh
  config, params = load(cfg, ctx.source, mesh)
  batches = stage_context.calibration(cfg, config.vocab_size)
  ctx.log(f"[importance] {len(batches) * cfg.importance.batch_size} calibration samples of "
          f"{cfg.importance.seq_len} tokens, {config.num_params():,}-parameter {ctx.source.label} "
          "model")
  scores = importance.estimate(
      config, params, batches, batch_sharding=lambda shape: partitioning.batch_sharding(mesh, shape),
      log=ctx.log, **estimate_options(cfg))
  scores.save(out.staging)
  ctx.log(f"[importance] done in {time.perf_counter() - started:.1f}s; scores in {out.final()}")
  return scores.summary()
