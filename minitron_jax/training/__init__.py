"""Retraining: the distillation step and loop, pretraining the shipped teacher, the stored
(offline) teacher's top-k logits.

Modules: distill (the step), loop, loss_terms, pretrain, teacher_logits_store.
"""

__all__ = [
    'distill',
    'loop',
    'loss_terms',
    'pretrain',
    'teacher_logits_store',
]
