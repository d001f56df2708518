"""Llama (1-3.x): the plain decoder every other family departs from. Llama 3.1's RoPE scaling and
optional attention / MLP biases are read from config.json."""

from minitron_jax.families.family import Family


def _to_hf(config, hf):
  return {**hf, "attention_bias": config.qkv_bias, "mlp_bias": config.mlp_bias}


def _llama3_rope(factor: float) -> dict:
  return dict(kind="llama3", factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=8192)


PRESETS = {
    "llama3_2_1b": dict(
        vocab_size=128256, hidden_size=2048, num_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, intermediate_size=8192, norm_eps=1e-5,
        rope_theta=500000.0, rope_scaling=_llama3_rope(32.0), tie_word_embeddings=True,
        max_position_embeddings=131072),
    "llama3_1_8b": dict(
        vocab_size=128256, hidden_size=4096, num_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, intermediate_size=14336, norm_eps=1e-5,
        rope_theta=500000.0, rope_scaling=_llama3_rope(8.0), max_position_embeddings=131072),
}

LLAMA = Family(name="llama", architecture="LlamaForCausalLM", allows=frozenset({"mlp_bias"}),
               fields_to_hf=_to_hf, presets=PRESETS, gguf_architecture="llama",
               gguf_permuted_qk=True)
