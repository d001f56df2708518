"""Qwen3: RMS-normalised queries and keys per head, head_dim 128 unless stated; an optional
sliding window on the upper layers."""

from minitron_jax.families import windows
from minitron_jax.families.family import Family


def tiny(hidden: int, layers: int) -> dict:
  del hidden, layers
  return dict(norm_eps=1e-6, rope_theta=1e6)


QWEN3 = Family(
    name="qwen3", architecture="Qwen3ForCausalLM", qk_norm=True, default_head_dim=128,
    allows=frozenset({"sliding_window", "per_layer_windows"}), windows=windows.qwen,
    fields_to_hf=lambda config, hf: {**hf, "attention_bias": config.qkv_bias,
                                     **windows.qwen_to_hf(config)},
    tiny=tiny, gguf_architecture="qwen3")
