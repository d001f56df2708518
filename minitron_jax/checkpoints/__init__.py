"""Models in and out: Hugging Face safetensors (and each family's tensor differences), GGUF,
orbax checkpoints of stage outputs, and building a model from a run's model settings.

Modules: build, checkpoint, gguf_checkpoint, hf, hf_config, hf_moe.
"""

__all__ = ['build', 'checkpoint', 'gguf_checkpoint', 'hf', 'hf_config', 'hf_moe']
