"""Models in and out: Hugging Face safetensors (config.json in hf_config, through the families;
tensors and files in hf: `hf.load`, `hf.save`), GGUF, orbax checkpoints of stage outputs, and
building a model from a run's model settings.

Modules: build, checkpoint, gguf_checkpoint, hf, hf_config, orbax_arrays.
"""

from minitron_jax.core import exports

ENTRY_POINTS = {
    "build": ("ModelSource", "model_config"),
    "checkpoint": ("save_model", "load_model", "is_saved_model"),
    "gguf_checkpoint": ("is_gguf",),
}
__getattr__, __dir__, __all__ = exports.lazy(__name__, ENTRY_POINTS)
