"""The compression method: activation importance, pruning to a target (`prune.prune`), the
search space and the search loop.

Modules: importance, prune, search, search_space.
"""

from minitron_jax.core import exports

ENTRY_POINTS = {
    "importance": ("estimate", "Scores", "lm_loss"),
    "prune": ("select", "validate_target", "target_keys", "target_config", "iterative_prune"),
    "search": ("SearchSpace", "Candidate", "SearchResult", "enumerate_candidates", "run_search"),
}
__getattr__, __dir__, __all__ = exports.lazy(__name__, ENTRY_POINTS)
