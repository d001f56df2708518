"""Losses: next-token cross-entropy, the distillation terms, and the chunked head loss with its
fused and top-k KL divergences and chunked cross-entropy.

Modules: chunked_ce, chunked_head_loss, fused_kld, head_loss_layout, losses, sparse_kld.
"""

__all__ = [
    'chunked_ce',
    'chunked_head_loss',
    'fused_kld',
    'head_loss_layout',
    'losses',
    'sparse_kld',
]
