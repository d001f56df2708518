"""The compression method: activation importance, pruning to a target, the search space and
the search loop.

Modules: importance, prune, search, search_space.
"""

__all__ = [
    'importance',
    'prune',
    'search',
    'search_space',
]
