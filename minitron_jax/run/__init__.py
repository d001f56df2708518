"""The main job: settings schema, stages and their shared context, validation, pipeline,
evaluate and report stages, the workdir lock.

Modules: check, evaluate_stage, pipeline, report, report_curves, run_config, search_score, stage_context, stages, task_config, teacher_logits, validate, workdir_lock.
"""

__all__ = [
    'check',
    'evaluate_stage',
    'pipeline',
    'report',
    'report_curves',
    'run_config',
    'search_score',
    'stage_context',
    'stages',
    'task_config',
    'teacher_logits',
    'validate',
    'workdir_lock',
]
