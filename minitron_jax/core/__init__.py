"""Plumbing every layer uses: atomic writes, multi-process helpers, SIGTERM handling, plots, the
package's shipped assets, optional packages imported where they are used.

Modules: assets, atomic, distributed, optional, plots, preemption.
"""

__all__ = [
    'assets',
    'atomic',
    'distributed',
    'optional',
    'plots',
    'preemption',
]
