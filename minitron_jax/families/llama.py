"""Llama (1-3.x): the plain decoder every other family departs from. Llama 3.1's RoPE scaling and
optional attention / MLP biases are read from config.json."""

from minitron_jax.families.family import Family


def _to_hf(config, hf):
  return {**hf, "attention_bias": config.qkv_bias, "mlp_bias": config.mlp_bias}


LLAMA = Family(name="llama", architecture="LlamaForCausalLM", allows=frozenset({"mlp_bias"}),
               fields_to_hf=_to_hf)
