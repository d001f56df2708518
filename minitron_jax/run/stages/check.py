"""The `check` stage: build or load the model, score the embedded corpus, prove the HF round trip.

It is the smallest end-to-end use of the foundation: sharded forward pass, loss on real text,
export to a Hugging Face directory and re-import with identical logits.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from minitron_jax.checkpoints import hf
from minitron_jax.compress import importance
from minitron_jax.core import atomic, distributed
from minitron_jax.models import model, partitioning, sharding
from minitron_jax.run import registry, stage_context


def run(ctx: stage_context.Context, out: registry.Outputs) -> dict:
  plan, log = ctx.plan, ctx.log
  started = time.perf_counter()
  mesh = ctx.mesh
  log(f"[check] mesh {dict(mesh.shape)} on {jax.devices()[0].platform}")
  config, params = ctx.load(ctx.source)
  log(f"[check] {config.family} model: {config.num_layers} layers, hidden {config.hidden_size}, "
      f"{config.num_params():,} parameters")

  batches = plan.validation(config.vocab_size)
  losses = []
  for i, batch in enumerate(batches):
    losses.append(importance.lm_loss(config, params, [batch],
                                     lambda shape: partitioning.batch_sharding(mesh, shape)))
    log(f"[check] batch {i + 1}/{len(batches)} loss {losses[-1]:.4f}")

  log(f"[check] exporting to {out.final('hf')}")
  exported = out.staged("hf")
  hf.save(exported, config, params, dtype=plan.export_dtype,  # gathered weight by weight
          tokenizer=plan.load_tokenizer(config.vocab_size))
  reloaded_config, reloaded = hf.load(exported, param_dtype=config.param_dtype)
  reloaded_config = reloaded_config.replace(dtype=config.dtype, remat=config.remat)
  # Both models on the mesh, as training places them; only the probe's logits come back.
  probe_tokens = batches[0]["tokens"]
  probe = distributed.put(probe_tokens, partitioning.batch_sharding(mesh, probe_tokens.shape))
  original_logits = distributed.to_host(model.apply(config, params, probe))
  reloaded_logits = distributed.to_host(model.apply(
      reloaded_config, sharding.shard_params(reloaded_config, reloaded, mesh), probe))
  round_trip_error = float(np.max(np.abs(original_logits - reloaded_logits)) /
                           np.max(np.abs(original_logits)))
  if plan.export_dtype == "float32" and round_trip_error > 1e-6:
    raise RuntimeError(f"Hugging Face round trip changed logits: relative error "
                       f"{round_trip_error:.3g}")

  metrics = dict(family=config.family, num_params=config.num_params(),
                 validation_loss=float(np.mean(losses)),
                 validation_perplexity=float(np.exp(np.mean(losses))),
                 tokens_scored=int(sum((b["segment_ids"] != 0).sum() for b in batches)),
                 hf_round_trip_relative_error=round_trip_error,
                 devices=jax.device_count(), seconds=time.perf_counter() - started)
  atomic.write_json(out.staged("metrics"), metrics)
  atomic.write_text(out.staged("report"), _report(config, metrics))
  log(f"[check] done in {metrics['seconds']:.1f}s: loss {metrics['validation_loss']:.4f}, "
      f"round-trip error {round_trip_error:.2g}; report at {out.final('report')}")
  return metrics


def _report(config, metrics: dict) -> str:
  rows = "\n".join(f"| {k} | {v} |" for k, v in metrics.items())
  return (f"# Model check\n\n{config.family} decoder, {config.num_layers} layers, hidden "
          f"{config.hidden_size}, heads {config.num_attention_heads}/{config.num_key_value_heads}"
          f", head_dim {config.head_dim}, MLP {config.intermediate_size}.\n\n"
          f"Loss is next-token cross-entropy on the validation split of the configured data.\n\n| metric | value |\n|---|---|\n{rows}\n")
