"""Programs over whole runs: sweeps and their reports, memory plans, scaling checks, benchmark
timing helpers.

Modules: benchmark, memory_plan, scaling, sweep, sweep_report.
"""

from minitron_jax.core import exports

ENTRY_POINTS = {
    "memory_plan": ("programs", "measure", "max_batch"),
    "sweep": ("points_of", "apply"),
}
__getattr__, __dir__, __all__ = exports.lazy(__name__, ENTRY_POINTS)
