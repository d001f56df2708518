"""Models in and out: Hugging Face safetensors (config.json in hf_config, through the families;
tensors and files in hf), GGUF, orbax checkpoints of stage outputs, and building a model from a
run's model settings.

Modules: build, checkpoint, gguf_checkpoint, hf, hf_config.
"""

__all__ = [
    'build',
    'checkpoint',
    'gguf_checkpoint',
    'hf',
    'hf_config',
]
