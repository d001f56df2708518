"""The `prune` stage: the source model cut to the target (or the search's pick), saved as an
orbax checkpoint and a Hugging Face export, with the zero-shot validation loss of both.
"""

from __future__ import annotations

import time

from minitron_jax.checkpoints import checkpoint, hf
from minitron_jax.compress import importance, prune
from minitron_jax.core import atomic, distributed
from minitron_jax.errors import ConfigError
from minitron_jax.models import model
from minitron_jax.run import registry, stage_context
from minitron_jax.run.stage_context import Context, load, validation
from minitron_jax.run.stage_settings import estimate_options, prune_options


def chosen_target(ctx: Context) -> dict:
  """The search's best candidate when a search ran here, else the configured target."""
  searched = stage_context.searched_target(ctx.directory)
  if searched is not None:
    return searched
  if not ctx.target:
    raise ConfigError("no prune target: set prune.target (or compression stages), or run search")
  return dict(ctx.target)


def run(ctx: Context, out: registry.Outputs) -> dict:
  cfg = ctx.cfg
  started = time.perf_counter()
  config, params = load(cfg, ctx.source, ctx.mesh)
  target = chosen_target(ctx)
  if cfg.prune.iterative_rounds > 1:
    # Paper Table 10: re-estimate on the partly pruned model between rounds.
    ctx.log(f"[prune] iterative importance over {cfg.prune.iterative_rounds} rounds")
    pruned_config, pruned, _ = prune.iterative_prune(
        config, distributed.to_host(params),
        lambda: stage_context.calibration(cfg, config.vocab_size), target,
        rounds=cfg.prune.iterative_rounds, log=ctx.log, estimate_options=estimate_options(cfg),
        **prune_options(cfg))
  else:
    scores = importance.Scores.load(registry.path(ctx.directory, "importance", "directory"))
    pruned_config, pruned = prune.prune(config, distributed.to_host(params), scores, target,
                                        **prune_options(cfg))
  reinitialize = bool(cfg.prune.get("reinitialize", False))
  if reinitialize:
    ctx.log("[prune] reinitialize: the target architecture with random weights")
    pruned = model.init(pruned_config, cfg.model.seed + 1)
  batches = validation(cfg, config.vocab_size)
  losses = {name: importance.lm_loss(c, p, batches)
            for name, (c, p) in (("source", (config, params)), ("pruned", (pruned_config, pruned)))}
  ctx.log(f"[prune] {config.num_params():,} -> {pruned_config.num_params():,} parameters "
          f"({pruned_config.num_params() / config.num_params():.1%}); zero-shot validation loss "
          f"{losses['source']:.4f} -> {losses['pruned']:.4f}")
  hf.save(out.staged("hf"), pruned_config, pruned, dtype=cfg.export_dtype,
          tokenizer=stage_context.load_tokenizer(cfg, pruned_config.vocab_size))
  checkpoint.save_model(out.staged("model"),
                        pruned_config.replace(dtype="float32", remat="none"), pruned)
  summary = dict(source=config.to_dict(), pruned=pruned_config.to_dict(), target=target,
                 source_params=config.num_params(), pruned_params=pruned_config.num_params(),
                 source_validation_loss=losses["source"], pruned_validation_loss=losses["pruned"],
                 reinitialized=reinitialize,
                 seconds=time.perf_counter() - started)
  atomic.write_json(out.staged("summary"), summary)
  ctx.log(f"[prune] done in {summary['seconds']:.1f}s; orbax checkpoint in {out.final('model')}, "
          f"Hugging Face export in {out.final('hf')}")
  return summary
