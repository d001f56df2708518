"""minitron-jax: structured pruning and knowledge distillation of decoder LLMs in JAX/Flax."""

__version__ = "0.1.0"
