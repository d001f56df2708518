"""Retraining: the distillation step and loop, pretraining the shipped teacher, the stored
(offline) teacher's top-k logits.

Modules: distill, pretrain, teacher_logits_store.
"""

__all__ = [
    'distill',
    'pretrain',
    'teacher_logits_store',
]
