"""Plumbing every layer uses: atomic writes, multi-process helpers, SIGTERM handling, the workdir
lock, plots and training curves, the package's shipped assets, optional packages imported where
they are used, and the subpackages' lazy entry points.

Modules: assets, atomic, curves, distributed, exports, optional, plots, preemption, workdir_lock.
"""

from minitron_jax.core import exports

ENTRY_POINTS = {
    "atomic": ("write_json", "write_text", "publish"),
    "distributed": ("initialize", "to_host", "put", "barrier", "is_primary"),
    "preemption": ("Preempted",),
}
__getattr__, __dir__, __all__ = exports.lazy(__name__, ENTRY_POINTS)
