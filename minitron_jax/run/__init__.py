"""The main job: the settings schema (run_config), the stage registry (every stage's name,
outputs and needs), one module per stage in `stages/` on a shared context, settings and
retraining, validation and the pipeline.

Modules: pipeline, registry, retrain, run_config, search_score, stage_context, stage_settings,
stages, task_config, teacher_logits_inputs, validate.
"""

__all__ = [
    'pipeline',
    'registry',
    'retrain',
    'run_config',
    'search_score',
    'stage_context',
    'stage_settings',
    'stages',
    'task_config',
    'teacher_logits_inputs',
    'validate',
]
