"""The `prune` stage: the source model cut to the target (or the search's pick), saved as an
orbax checkpoint and a Hugging Face export, with the zero-shot validation loss of both.
"""

from __future__ import annotations

import dataclasses
import time

from minitron_jax.checkpoints import checkpoint, hf
from minitron_jax.compress import importance, prune
from minitron_jax.core import atomic
from minitron_jax.errors import ConfigError
from minitron_jax.models import model, partitioning, sharding
from minitron_jax.models.config import ModelConfig
from minitron_jax.run import registry, stage_context
from minitron_jax.run.problems import Problems
from minitron_jax.run.stage_context import Context
from minitron_jax.run.stage_settings import Calibration, Estimate, Selection


@dataclasses.dataclass(frozen=True)
class PruneSettings:
  """selection: what prune.prune keeps; estimate: the scores the importance stage writes (their
  block sizes bound depth pruning); iterative_rounds T > 1 re-estimates importance on
  `calibration` between T pruning steps (paper Table 10; None only in a plan with problems);
  reinitialize: the target architecture
  with fresh random weights from `reinitialize_seed` (paper Table 12's baseline)."""

  selection: Selection
  estimate: Estimate
  iterative_rounds: int = 1
  calibration: Calibration | None = None
  reinitialize: bool = False
  reinitialize_seed: int = 1


def chosen_target(ctx: Context) -> dict:
  """The search's best candidate when a search ran here, else the configured target."""
  searched = stage_context.searched_target(ctx.directory)
  if searched is not None:
    return searched
  if not ctx.target:
    raise ConfigError("no prune target: set prune.target (or compression stages), or run search")
  return dict(ctx.target)


def planned_shape(selection: Selection, estimate: Estimate, source: ModelConfig, target: dict,
                  problems: Problems, where: str, *, rounds: int = 1) -> ModelConfig | None:
  """The architecture pruning makes of `source` for `target` with `selection`, from scores
  `estimate` makes, or None after noting why it cannot: in `rounds` steps (this stage's
  iterative rounds, each re-estimating importance as `estimate` says), or in one, as the search
  prunes each candidate."""
  if rounds > 1:
    targets = problems.attempt("prune.iterative_rounds", prune.iterative_targets, source,
                               dict(target), rounds)
    if targets is None:
      return None
  else:
    targets = [dict(target)]
  options = selection.check_options(estimate)
  shape = source
  for index, round_target in enumerate(targets):
    if index:  # each round estimates importance on the model the last round left
      problems.attempt("importance", importance.check_options, shape, **estimate.options())
    full = problems.attempt(where, prune.check_selection, shape, round_target, **options)
    if full is None:
      return None
    shape = prune.target_config(shape, full)
  return shape


def run(ctx: Context, out: registry.Outputs) -> dict:
  settings: PruneSettings = ctx.settings
  plan = ctx.plan
  started = time.perf_counter()
  config, params = ctx.load(ctx.source)
  target = chosen_target(ctx)
  rounds = settings.iterative_rounds
  # On the mesh: the kept indices gathered under jit, the pruned model born sharded, in the
  # source's dtype (distillation casts what it trains).
  shardings = lambda pruned_config: sharding.param_shardings(pruned_config, ctx.mesh)  # noqa: E731
  batch_sharding = lambda shape: partitioning.batch_sharding(ctx.mesh, shape)  # noqa: E731
  if rounds > 1:
    # Paper Table 10: re-estimate on the partly pruned model between rounds.
    ctx.log(f"[prune] iterative importance over {rounds} rounds")
    pruned_config, pruned, _ = prune.iterative_prune(
        config, params, lambda: plan.calibration(settings.calibration, config.vocab_size),
        target, rounds=rounds, log=ctx.log,
        estimate_options=settings.calibration.estimate.options(),
        batch_sharding=batch_sharding, shardings=shardings, merge_dtype=plan.param_dtype,
        **settings.selection.options())
  else:
    scores = importance.Scores.load(registry.path(ctx.directory, "importance", "directory"))
    pruned_config, pruned = prune.prune(config, params, scores, target, shardings=shardings,
                                        merge_dtype=plan.param_dtype,
                                        **settings.selection.options())
  if settings.reinitialize:
    ctx.log("[prune] reinitialize: the target architecture with random weights")
    pruned_config = pruned_config.replace(param_dtype=plan.param_dtype)
    pruned = model.init(pruned_config, settings.reinitialize_seed,
                        out_shardings=shardings(pruned_config))
  batches = plan.validation(config.vocab_size)
  losses = {name: importance.lm_loss(c, p, batches, batch_sharding)
            for name, (c, p) in (("source", (config, params)), ("pruned", (pruned_config, pruned)))}
  ctx.log(f"[prune] {config.num_params():,} -> {pruned_config.num_params():,} parameters "
          f"({pruned_config.num_params() / config.num_params():.1%}); zero-shot validation loss "
          f"{losses['source']:.4f} -> {losses['pruned']:.4f}")
  hf.save(out.staged("hf"), pruned_config, pruned, dtype=plan.export_dtype,
          tokenizer=plan.load_tokenizer(pruned_config.vocab_size))
  checkpoint.save_model(out.staged("model"),
                        pruned_config.replace(dtype="float32", remat="none"), pruned)
  summary = dict(source=config.to_dict(), pruned=pruned_config.to_dict(), target=target,
                 source_params=config.num_params(), pruned_params=pruned_config.num_params(),
                 source_validation_loss=losses["source"], pruned_validation_loss=losses["pruned"],
                 reinitialized=settings.reinitialize,
                 seconds=time.perf_counter() - started)
  atomic.write_json(out.staged("summary"), summary)
  ctx.log(f"[prune] done in {summary['seconds']:.1f}s; orbax checkpoint in {out.final('model')}, "
          f"Hugging Face export in {out.final('hf')}")
  return summary
