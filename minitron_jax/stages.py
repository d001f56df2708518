"""The `importance` and `prune` stages of the main job: thin adapters from config to library."""

from __future__ import annotations

import json
import pathlib
import time

import jax
import ml_collections

from minitron_jax import build, checkpoint, corpus, hf, importance, prune, sharding
from minitron_jax.config import ConfigError


def _source_model(cfg: ml_collections.ConfigDict, mesh):
  model_config = build.model_config(cfg.model)
  config, params = build.load_model(
      cfg.model, out_shardings=sharding.param_shardings(model_config, mesh))
  return config, sharding.shard_params(config, params, mesh)


def _calibration(cfg: ml_collections.ConfigDict, vocab_size: int):
  section = cfg.importance
  if vocab_size < corpus.BYTE_VOCAB:
    raise ConfigError(f"vocab_size={vocab_size} cannot score byte tokens; need >= 256")
  try:
    return corpus.calibration_batches(cfg.data.source, section.num_samples, section.batch_size,
                                      section.seq_len, cfg.seed)
  except ValueError as error:
    raise ConfigError(str(error)) from None


def _estimate_options(cfg: ml_collections.ConfigDict) -> dict:
  section = cfg.importance
  return dict(aggregation=(section.batch_aggregation, section.seq_aggregation),
              block_sizes=tuple(section.block_sizes), drop_loss=section.drop_loss,
              drop_block_sizes=tuple(section.drop_block_sizes),
              drop_loss_batches=section.drop_loss_batches)


def run_importance(cfg: ml_collections.ConfigDict, workdir: pathlib.Path, log=print) -> dict:
  out = workdir / "importance"
  started = time.perf_counter()
  mesh = sharding.make_mesh(sharding.MeshConfig(**cfg.mesh))
  config, params = _source_model(cfg, mesh)
  batches = _calibration(cfg, config.vocab_size)
  log(f"[importance] {len(batches) * batches.shape[1]} calibration samples of "
      f"{batches.shape[2]} tokens, {config.num_params():,}-parameter {config.family} model")
  scores = importance.estimate(
      config, params, batches, batch_sharding=lambda shape: sharding.batch_sharding(mesh, shape),
      log=log, **_estimate_options(cfg))
  scores.save(out)
  log(f"[importance] done in {time.perf_counter() - started:.1f}s; scores in {out}")
  return scores.summary()


def run_prune(cfg: ml_collections.ConfigDict, workdir: pathlib.Path, log=print) -> dict:
  out = workdir / "prune"
  started = time.perf_counter()
  mesh = sharding.make_mesh(sharding.MeshConfig(**cfg.mesh))
  config, params = _source_model(cfg, mesh)
  section = cfg.prune
  target = dict(section.target)
  options = dict(aggregation=(cfg.importance.batch_aggregation, cfg.importance.seq_aggregation),
                 head_merging=section.head_merging, depth_criterion=section.depth_criterion,
                 contiguous_depth=section.contiguous_depth)
  if section.iterative_rounds > 1:
    # Paper Table 10: re-estimate on the partly pruned model between rounds.
    log(f"[prune] iterative importance over {section.iterative_rounds} rounds")
    pruned_config, pruned, _ = prune.iterative_prune(
        config, jax.device_get(params), lambda: _calibration(cfg, config.vocab_size), target,
        rounds=section.iterative_rounds, log=log, estimate_options=_estimate_options(cfg),
        **options)
  else:
    scores = importance.Scores.load(workdir / "importance")
    pruned_config, pruned = prune.prune(config, jax.device_get(params), scores, target, **options)
  validation = corpus.byte_windows(corpus.stdlib_bytes("validation"), cfg.data.batch_size,
                                   cfg.data.seq_len + 1, cfg.data.num_batches, cfg.seed)
  losses = {name: importance.lm_loss(c, p, list(validation))
            for name, (c, p) in (("source", (config, params)), ("pruned", (pruned_config, pruned)))}
  log(f"[prune] {config.num_params():,} -> {pruned_config.num_params():,} parameters "
      f"({pruned_config.num_params() / config.num_params():.1%}); zero-shot validation loss "
      f"{losses['source']:.4f} -> {losses['pruned']:.4f}")
  hf.save(out / "hf", pruned_config, pruned, dtype=cfg.export_dtype)
  checkpoint.save_model(out / "model", pruned_config, pruned)
  summary = dict(source=config.to_dict(), pruned=pruned_config.to_dict(), target=target,
                 source_params=config.num_params(), pruned_params=pruned_config.num_params(),
                 source_validation_loss=losses["source"], pruned_validation_loss=losses["pruned"],
                 seconds=time.perf_counter() - started)
  (out / "summary.json").write_text(json.dumps(summary, indent=2))
  log(f"[prune] done in {summary['seconds']:.1f}s; orbax checkpoint in {out / 'model'}, "
      f"Hugging Face export in {out / 'hf'}")
  return summary
