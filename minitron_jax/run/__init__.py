"""The main job: the settings schema, the stage registry (every stage's name, outputs and needs),
one module per stage (*_stage.py, check, teacher_logits, report) on a shared context, settings
and retraining, validation, the pipeline and the workdir lock.

Modules: check, distill_stage, evaluate_stage, importance_stage, pipeline, prune_stage, registry,
report, report_curves, retrain, run_config, search_score, search_stage, stage_context,
stage_settings, stored_teacher, task_config, teacher_correction_stage, teacher_logits, validate,
workdir_lock.
"""

__all__ = [
    'check',
    'distill_stage',
    'evaluate_stage',
    'importance_stage',
    'pipeline',
    'prune_stage',
    'registry',
    'report',
    'report_curves',
    'retrain',
    'run_config',
    'search_score',
    'search_stage',
    'stage_context',
    'stage_settings',
    'stored_teacher',
    'task_config',
    'teacher_correction_stage',
    'teacher_logits',
    'validate',
    'workdir_lock',
]
