"""Nemotron(-4): an ungated squared-ReLU MLP, LayerNorm with a (1 + w) scale and RoPE on half of
each head by default."""

from minitron_jax.families.family import Family


def _to_hf(config, hf):
  return {**hf, "rope_parameters": {**hf["rope_parameters"],
                                    "partial_rotary_factor": config.partial_rotary_factor},
          "partial_rotary_factor": config.partial_rotary_factor,
          "attention_bias": config.qkv_bias, "mlp_bias": config.mlp_bias}


def tiny(hidden: int, layers: int) -> dict:
  del hidden, layers
  return dict(partial_rotary_factor=0.5)


PRESETS = {
    "nemotron4_15b": dict(
        vocab_size=256000, hidden_size=6144, num_layers=32, num_attention_heads=48,
        num_key_value_heads=8, head_dim=128, intermediate_size=24576, norm_eps=1e-5,
        partial_rotary_factor=0.5, max_position_embeddings=4096),
}

NEMOTRON = Family(
    name="nemotron", architecture="NemotronForCausalLM", gated_mlp=False, norm="layernorm1p",
    default_activation="relu2", norm_eps_field="norm_eps", default_norm_eps=1e-5,
    default_partial_rotary=0.5, allows=frozenset({"partial_rotary", "mlp_bias"}),
    fields_to_hf=_to_hf, tiny=tiny, presets=PRESETS)
