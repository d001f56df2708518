"""Losses: next-token cross-entropy, the distillation terms, and the chunked head loss with its
fused and top-k KL divergences and chunked cross-entropy.

Modules: chunked_ce, chunked_head_loss, fused_kld, head_loss_layout, losses, sparse_kld.
"""

from minitron_jax.core import exports

ENTRY_POINTS = {
    "losses": ("LossConfig", "cross_entropy", "combine"),
    "sparse_kld": ("teacher_top_k",),
}
__getattr__, __dir__, __all__ = exports.lazy(__name__, ENTRY_POINTS)
