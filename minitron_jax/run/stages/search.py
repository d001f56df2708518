"""The `search` stage (paper §3): prune every feasible candidate, retrain each briefly (or score it
as pruned), keep the best; resumable after any candidate.
"""

from __future__ import annotations

import json
import time

from minitron_jax.compress import importance, prune, search
from minitron_jax.core import atomic, distributed, preemption
from minitron_jax.errors import ConfigError
from minitron_jax.evaluation import evaluate
from minitron_jax.models import sharding
from minitron_jax.run import registry, retrain, search_score
from minitron_jax.run.stage_context import Context, load, load_tokenizer, validation
from minitron_jax.run.stage_settings import (prune_options, retrain_settings, search_candidates,
                                             search_space)


def check(cfg) -> list[str]:
  """The search's score settings and the scoring they need, one line per problem."""
  problems = search_score.check(cfg)
  try:
    evaluate.check_scoring(batch_size=cfg.evaluate.batch_size, max_length=cfg.evaluate.max_length)
  except ConfigError as e:
    problems.append(f"evaluate: {e}")
  return problems


def run(ctx: Context, out: registry.Outputs) -> dict:
  """Paper §3: prune every feasible candidate, distil each briefly, keep the best."""
  cfg = ctx.cfg
  started = time.perf_counter()
  section = cfg.search
  mesh = ctx.mesh
  config, params = load(cfg, ctx.source, mesh)
  teacher_config, teacher, offline = retrain.teacher_for(ctx)
  host_params = distributed.to_host(params)
  scores = importance.Scores.load(registry.path(ctx.directory, "importance", "directory"))
  candidates = search_candidates(cfg, config)
  score = search_score.parse(section)
  before = score is not None and score.before_retraining
  eval_steps = (0,) if before else tuple(section.eval_steps)
  ctx.log(f"[search] {len(candidates)} candidates within {section.space.tolerance:.0%} of "
          f"{search_space(cfg).describe()}; "
          f"{'no retraining' if before else f'{section.retrain_steps} steps each'}"
          f"{'' if score is None else f', ranked by {score.name}'}")
  # Saved evaluations of another ranking are not reused: each score has its own progress file.
  progress = out.work("progress")
  if score is not None:
    progress = progress.with_name(f"progress.{score.slug}.json")
  done = json.loads(progress.read_text()) if progress.exists() else {}
  score_of = (None if score is None
              else search_score.scorer(cfg, out.work("harness_tasks"), mesh))
  tok = load_tokenizer(cfg, config.vocab_size)

  def evaluate_candidate(candidate) -> dict[int, float]:
    ctx.log(f"[search] candidate {candidate.name}: {candidate.num_params:,} parameters")
    pruned_config, pruned = prune.prune(config, host_params, scores, candidate.target,
                                        **prune_options(cfg))
    pruned = sharding.shard_params(pruned_config, pruned, mesh)
    if before:  # Model Optimizer's way: score the pruned candidate as it is
      loss = importance.lm_loss(pruned_config, pruned, validation(cfg, config.vocab_size))
      return {0: loss}, score_of(pruned_config, pruned, tok)
    run_dir = out.work("candidates") / candidate.name
    settings = retrain_settings(cfg, cfg.distill, pruned_config, teacher_config,
                                section.retrain_steps, eval_steps=section.eval_steps,
                                checkpoint_every=section.retrain_steps,
                                offline=offline is not None)
    trained, _ = retrain.retrain(ctx, settings, pruned, teacher, run_dir,
                                 label=f"search {candidate.name}", offline=offline)
    distributed.barrier(f"searched {candidate.name}")  # the primary wrote metrics.jsonl
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["val_ce"] for r in records if "val_ce" in r}
    losses = {s: losses[s] for s in section.eval_steps}
    if score_of is None:
      return losses
    return losses, score_of(settings.student_config, trained, tok)

  def save_progress(candidate, losses) -> None:  # a killed search resumes after this candidate
    done[candidate.name] = losses
    atomic.write_json(progress, done)
    if preemption.requested_anywhere():  # SIGTERM came between two candidates' training loops
      raise preemption.Preempted(f"[search] stopped by SIGTERM after candidate {candidate.name}; "
                                 f"progress saved in {progress}; run the same command again to "
                                 "resume")

  with preemption.watch():
    result = search.run_search(candidates, evaluate_candidate, eval_steps, done=dict(done),
                               on_result=save_progress,
                               score_name=None if score is None else score.name, log=ctx.log)
  atomic.write_text(out.staged("report"), result.to_markdown())
  atomic.write_text(out.staged("result"), result.to_json())
  ctx.log(f"[search] best {result.best.name} ({result.best.num_params:,} parameters) in "
          f"{time.perf_counter() - started:.0f}s; table in {out.final('report')}")
  return {"best": result.best.name, "seconds": time.perf_counter() - started}
