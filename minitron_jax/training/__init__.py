"""Retraining: the distillation step and loop, pretraining the shipped teacher, the stored
(offline) teacher's top-k logits.

Modules: distill (the step), loop, loss_terms, pretrain, teacher_logits_store.
"""

from minitron_jax.core import exports

ENTRY_POINTS = {
    "distill": ("Distiller", "OptimizerConfig"),
    "loop": ("train", "LoopConfig", "Diverged"),
}
__getattr__, __dir__, __all__ = exports.lazy(__name__, ENTRY_POINTS)
