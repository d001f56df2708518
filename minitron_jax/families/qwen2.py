"""Qwen2 / Qwen2.5: biases on the query, key and value projections only; an optional sliding
window on the upper layers."""

from minitron_jax.families import windows
from minitron_jax.families.family import Family


def _bias_rule(config) -> tuple[bool, str]:
  return (config.qkv_bias and not config.o_bias and not config.mlp_bias,
          f"qkv_bias={config.qkv_bias}, o_bias={config.o_bias}, mlp_bias={config.mlp_bias}")


def tiny(hidden: int, layers: int) -> dict:
  del hidden, layers
  return dict(qkv_bias=True, tie_word_embeddings=True, norm_eps=1e-6, rope_theta=1e6)


QWEN2 = Family(
    name="qwen2", architecture="Qwen2ForCausalLM",
    allows=frozenset({"sliding_window", "per_layer_windows"}),
    biases=lambda hf: (True, False), bias_rule=_bias_rule, windows=windows.qwen,
    fields_to_hf=lambda config, hf: {**hf, **windows.qwen_to_hf(config)}, tiny=tiny,
    gguf_architecture="qwen2")
