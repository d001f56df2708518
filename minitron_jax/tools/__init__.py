"""Programs over whole runs: sweeps and their reports, memory plans, scaling checks, benchmark
timing helpers.

Modules: benchmark, memory_plan, scaling, sweep, sweep_report.
"""

__all__ = [
    'benchmark',
    'memory_plan',
    'scaling',
    'sweep',
    'sweep_report',
]
