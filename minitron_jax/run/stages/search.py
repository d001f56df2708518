"""The `search` stage (paper §3): prune every feasible candidate, retrain each briefly (or score it
as pruned), keep the best; resumable after any candidate.
"""

from __future__ import annotations

import dataclasses
import json
import time

from minitron_jax.compress import importance, prune, search
from minitron_jax.core import atomic, distributed, preemption
from minitron_jax.errors import ConfigError
from minitron_jax.evaluation import evaluate
from minitron_jax.models import partitioning, sharding
from minitron_jax.models.config import ModelConfig
from minitron_jax.run import registry, retrain, search_score, stage_context, task_config
from minitron_jax.run.stage_context import Context
from minitron_jax.run.stage_settings import Estimate, Retraining, Selection, search_candidates


@dataclasses.dataclass(frozen=True)
class SearchSettings:
  """space: the candidates' axes and constraints; max_candidates: the ones nearest the
  constraints to keep (0: all); eval_steps: the retraining steps each candidate is compared at;
  score: a task score that ranks instead of the validation loss (None: the loss), with `scoring`
  the evaluation settings it runs with; retraining: each candidate's; selection: how each is
  pruned, from the scores `estimate` makes."""

  space: search.SearchSpace | None
  max_candidates: int
  eval_steps: tuple[int, ...]
  score: search_score.TaskScore | None
  retraining: Retraining  # None, and space None, only in a plan with problems
  selection: Selection
  estimate: Estimate
  scoring: task_config.EvaluateSettings

  @property
  def retrain_steps(self) -> int:
    return self.retraining.steps

  def candidates(self, config: ModelConfig) -> list[search.Candidate]:
    """The candidates this search retrains for a source architecture (no weight is needed)."""
    return search_candidates(self.space, self.max_candidates, config)


def check(plan: stage_context.Plan) -> list[str]:
  """The search's score and the scoring it needs, one line per problem."""
  settings: SearchSettings = plan.settings_of("search")
  if settings is None:
    return []
  problems = search_score.check(settings.score, settings.scoring)
  try:
    evaluate.check_scoring(batch_size=settings.scoring.batch_size,
                           max_length=settings.scoring.max_length)
  except ConfigError as e:
    problems.append(f"evaluate: {e}")
  return problems


def run(ctx: Context, out: registry.Outputs) -> dict:
  """Paper §3: prune every feasible candidate, distil each briefly, keep the best."""
  settings: SearchSettings = ctx.settings
  plan = ctx.plan
  started = time.perf_counter()
  mesh = ctx.mesh
  config, params = ctx.load(ctx.source)
  scores = importance.Scores.load(registry.path(ctx.directory, "importance", "directory"))
  candidates = settings.candidates(config)
  score = settings.score
  before = score is not None and score.before_retraining
  # A teacher only where candidates retrain; the source itself when it is the teacher.
  teacher_config, teacher, offline = ((None, None, None) if before else
                                      retrain.teacher_for(ctx, (ctx.source, config, params)))
  eval_steps = (0,) if before else settings.eval_steps
  ctx.log(f"[search] {len(candidates)} candidates within {settings.space.tolerance:.0%} of "
          f"{settings.space.describe()}; "
          f"{'no retraining' if before else f'{settings.retrain_steps} steps each'}"
          f"{'' if score is None else f', ranked by {score.name}'}")
  # Saved evaluations of another ranking are not reused: each score has its own progress file.
  progress = out.work("progress")
  if score is not None:
    progress = progress.with_name(f"progress.{score.slug}.json")
  done = json.loads(progress.read_text()) if progress.exists() else {}
  score_of = (None if score is None
              else search_score.scorer(score, settings.scoring, out.work("harness_tasks"), mesh))
  tok = plan.load_tokenizer(config.vocab_size)

  def evaluate_candidate(candidate) -> dict[int, float]:
    ctx.log(f"[search] candidate {candidate.name}: {candidate.num_params:,} parameters")
    # On the mesh: each candidate is a jitted gather of the source's kept indices, born sharded.
    pruned_config, pruned = prune.prune(
        config, params, scores, candidate.target,
        shardings=lambda shape: sharding.param_shardings(shape, mesh),
        merge_dtype=plan.param_dtype, **settings.selection.options())
    if before:  # Model Optimizer's way: score the pruned candidate as it is
      loss = importance.lm_loss(pruned_config, pruned, plan.validation(config.vocab_size),
                                lambda shape: partitioning.batch_sharding(mesh, shape))
      return {0: loss}, score_of(pruned_config, pruned, tok)
    run_dir = out.work("candidates") / candidate.name
    # Trained in the plan's dtype (a bfloat16 checkpoint's slices stay bfloat16 until here).
    pruned_config = pruned_config.replace(param_dtype=plan.param_dtype)
    pruned = sharding.cast_params(pruned, plan.param_dtype)
    run = settings.retraining.for_models(pruned_config, teacher_config,
                                         offline=offline is not None)
    trained, _ = retrain.retrain(ctx, run, pruned, teacher, run_dir,
                                 label=f"search {candidate.name}", offline=offline)
    distributed.barrier(f"searched {candidate.name}")  # the primary wrote metrics.jsonl
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["val_ce"] for r in records if "val_ce" in r}
    losses = {s: losses[s] for s in settings.eval_steps}
    if score_of is None:
      return losses
    return losses, score_of(run.student_config, trained, tok)

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
