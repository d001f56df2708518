"""Scoring models: multiple-choice tasks and their scoring, perplexity, the embedded stdlib
task, the lm-evaluation-harness backend and our tasks written as harness tasks.

Modules: evaluate, lm_eval_backend, lm_eval_tasks, mc_tasks, stdlib_tasks.
"""

from minitron_jax.core import exports

ENTRY_POINTS = {
    "evaluate": ("evaluate_model", "score_multiple_choice", "perplexity", "load_task",
                 "markdown_table"),
    "stdlib_tasks": ("next_line_task",),
    "lm_eval_tasks": ("task_manager",),
}
__getattr__, __dir__, __all__ = exports.lazy(__name__, ENTRY_POINTS)
