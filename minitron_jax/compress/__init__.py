"""The compression method: activation importance, pruning to a target, architecture search.

Modules: importance, prune, search, search_space.
"""

__all__ = ['importance', 'prune', 'search', 'search_space']
