"""The `importance`, `prune` and `distill` stages of the main job: thin adapters from config to
library. Every stage reads its data through `data` with the configured tokenizer."""

from __future__ import annotations

import itertools
import json
import pathlib
import time

import jax
import ml_collections

from minitron_jax import (build, checkpoint, data, distill, hf, importance, prune, sharding,
                          tokenizer)
from minitron_jax.config import ConfigError
from minitron_jax.losses import LossConfig


def data_config(cfg: ml_collections.ConfigDict, **changes) -> data.DataConfig:
  return data.DataConfig.from_dict({**cfg.data.to_dict(), **changes})


def load_tokenizer(cfg: ml_collections.ConfigDict, vocab_size: int):
  spec = cfg.tokenizer or cfg.model.hf_path
  if not spec:
    raise ConfigError("config.tokenizer is empty and there is no model.hf_path to read "
                      "tokenizer.json from; set tokenizer='bytes' or a tokenizer path")
  tok = tokenizer.load_tokenizer(spec)
  if tok.vocab_size > vocab_size:
    raise ConfigError(f"tokenizer {tok.name} has {tok.vocab_size} tokens; the model's "
                      f"vocab_size={vocab_size} is smaller")
  return tok


def validation(cfg: ml_collections.ConfigDict, vocab_size: int) -> list:
  """The fixed validation batches every stage reports its loss on."""
  return data.validation_batches(data_config(cfg), load_tokenizer(cfg, vocab_size),
                                 cfg.eval_batches)


def source_model(cfg: ml_collections.ConfigDict, mesh):
  """The model the run starts from (and distils from), placed on the mesh."""
  model_config = build.model_config(cfg.model)
  config, params = build.load_model(
      cfg.model, out_shardings=sharding.param_shardings(model_config, mesh))
  return config, sharding.shard_params(config, params, mesh)


def _mesh(cfg):
  return sharding.make_mesh(sharding.MeshConfig(**cfg.mesh))


def _calibration(cfg: ml_collections.ConfigDict, vocab_size: int) -> list:
  section = cfg.importance
  batches = -(-section.num_samples // section.batch_size)
  iterator = data.make_iterator(
      data_config(cfg, seq_len=section.seq_len, batch_size=section.batch_size),
      load_tokenizer(cfg, vocab_size), "train")
  return list(itertools.islice(iterator, batches))


def _estimate_options(cfg: ml_collections.ConfigDict) -> dict:
  section = cfg.importance
  return dict(aggregation=(section.batch_aggregation, section.seq_aggregation),
              block_sizes=tuple(section.block_sizes), drop_loss=section.drop_loss,
              drop_block_sizes=tuple(section.drop_block_sizes),
              drop_loss_batches=section.drop_loss_batches)


def run_importance(cfg: ml_collections.ConfigDict, workdir: pathlib.Path, log=print) -> dict:
  out = workdir / "importance"
  started = time.perf_counter()
  mesh = _mesh(cfg)
  config, params = source_model(cfg, mesh)
  batches = _calibration(cfg, config.vocab_size)
  log(f"[importance] {len(batches) * cfg.importance.batch_size} calibration samples of "
      f"{cfg.importance.seq_len} tokens, {config.num_params():,}-parameter {config.family} model")
  scores = importance.estimate(
      config, params, batches, batch_sharding=lambda shape: sharding.batch_sharding(mesh, shape),
      log=log, **_estimate_options(cfg))
  scores.save(out)
  log(f"[importance] done in {time.perf_counter() - started:.1f}s; scores in {out}")
  return scores.summary()


def run_prune(cfg: ml_collections.ConfigDict, workdir: pathlib.Path, log=print) -> dict:
  out = workdir / "prune"
  started = time.perf_counter()
  config, params = source_model(cfg, _mesh(cfg))
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
  batches = validation(cfg, config.vocab_size)
  losses = {name: importance.lm_loss(c, p, batches)
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


def loss_config(section: ml_collections.ConfigDict) -> LossConfig:
  fields = section.to_dict()
  fields["hidden_pairs"] = tuple(tuple(pair) for pair in fields.get("hidden_pairs", ()))
  return LossConfig(**fields)


def run_distill(cfg: ml_collections.ConfigDict, workdir: pathlib.Path, log=print) -> dict:
  """Retrains the pruned student (workdir/prune/model) from the source model as teacher."""
  out = workdir / "distill"
  started = time.perf_counter()
  section = cfg.distill
  mesh = _mesh(cfg)
  teacher_config, teacher = source_model(cfg, mesh)
  if not checkpoint.is_saved_model(workdir / "prune" / "model"):
    raise ConfigError(f"no pruned student at {workdir / 'prune' / 'model'}; run the prune stage")
  student_config, _ = checkpoint.load_model(workdir / "prune" / "model")
  compute = dict(dtype=section.dtype, remat=section.remat)
  student_config = student_config.replace(**compute)
  teacher_config = teacher_config.replace(dtype=section.dtype)
  _, student = checkpoint.load_model(workdir / "prune" / "model",
                                     sharding.param_shardings(student_config, mesh))
  losses = loss_config(section.loss)
  distiller = distill.Distiller(
      student_config, teacher_config if losses.uses_teacher else None, losses,
      distill.OptimizerConfig(**section.optimizer.to_dict()), section.steps)
  tok = load_tokenizer(cfg, student_config.vocab_size)
  train_data = data_config(cfg, batch_size=section.batch_size, seq_len=section.seq_len)
  loop = distill.LoopConfig(steps=section.steps, log_every=section.log_every,
                            eval_every=section.eval_every,
                            checkpoint_every=section.checkpoint_every,
                            keep_checkpoints=section.keep_checkpoints)
  log(f"[distill] {section.steps} steps of {section.batch_size}x{section.seq_len} tokens; "
      f"student {student_config.num_params():,}, teacher {teacher_config.num_params():,} "
      f"parameters; losses {losses}")
  trained, final = distill.train(
      distiller, student, teacher, data.make_iterator(train_data, tok, "train"),
      validation(cfg, student_config.vocab_size), loop, out,
      batch_sharding=lambda shape: sharding.batch_sharding(mesh, shape), log=log)
  trained = jax.device_get(trained)
  saved_config = student_config.replace(dtype="float32", remat="none")
  checkpoint.save_model(out / "model", saved_config, trained)
  hf.save(out / "hf", saved_config, trained, dtype=cfg.export_dtype)
  summary = dict(steps=section.steps, student_params=student_config.num_params(), **final,
                 seconds=time.perf_counter() - started)
  (out / "summary.json").write_text(json.dumps(summary, indent=2))
  log(f"[distill] done in {summary['seconds']:.1f}s: validation loss {final['val_ce']:.4f}; "
      f"model in {out / 'model'}, Hugging Face export in {out / 'hf'}")
  return summary
