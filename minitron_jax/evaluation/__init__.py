"""Scoring models: multiple-choice tasks and their scoring, perplexity, the embedded stdlib
task, the lm-evaluation-harness backend and our tasks written as harness tasks.

Modules: evaluate, lm_eval_backend, lm_eval_tasks, mc_tasks, stdlib_tasks.
"""

__all__ = [
    'evaluate',
    'lm_eval_backend',
    'lm_eval_tasks',
    'mc_tasks',
    'stdlib_tasks',
]
