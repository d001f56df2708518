"""Plumbing every layer uses: atomic writes, multi-process helpers, SIGTERM handling, plots.

Modules: atomic, distributed, plots, preemption.
"""

__all__ = [
    'atomic',
    'distributed',
    'plots',
    'preemption',
]
