"""Plumbing every layer uses: atomic writes, multi-process helpers, SIGTERM handling, the workdir
lock, plots and training curves, the package's shipped assets, optional packages imported where
they are used.

Modules: assets, atomic, curves, distributed, optional, plots, preemption, workdir_lock.
"""

__all__ = [
    'assets',
    'atomic',
    'curves',
    'distributed',
    'optional',
    'plots',
    'preemption',
    'workdir_lock',
]
