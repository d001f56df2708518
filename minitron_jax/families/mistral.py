"""Mistral: Llama with one sliding window for every layer and no biases."""

from minitron_jax.families import windows
from minitron_jax.families.family import Family


def no_biases(config) -> tuple[bool, str]:
  return not (config.qkv_bias or config.o_bias or config.mlp_bias), "biases"


def tiny(hidden: int, layers: int) -> dict:
  del hidden, layers
  return dict(sliding_window=8)


MISTRAL = Family(
    name="mistral", architecture="MistralForCausalLM", allows=frozenset({"sliding_window"}),
    windows=windows.every_layer, bias_rule=no_biases,
    fields_to_hf=lambda config, hf: {**hf, "sliding_window": config.sliding_window}, tiny=tiny,
    gguf_architecture="llama", gguf_name_marker="mistral", gguf_permuted_qk=True)
