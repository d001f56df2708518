"""The main job: the settings schema (run_config), the plan a run's config becomes (plan: every
stage's typed settings), the stage registry (every stage's name, outputs and needs), one module
per stage in `stages/` on a shared context (stage_context), shared settings and retraining,
validation and the pipeline.

Modules: pipeline, plan, problems, registry, retrain, run_config, search_score, stage_context,
stage_settings, stages, task_config, teacher_logits_inputs, validate.
"""

from minitron_jax.core import exports

ENTRY_POINTS = {
    "pipeline": ("run",),
    "plan": ("build_plan",),
    "validate": ("checked_plan",),
    "run_config": ("base_config", "runlocal"),
    "stage_context": ("Plan", "Context"),
}
__getattr__, __dir__, __all__ = exports.lazy(__name__, ENTRY_POINTS)
