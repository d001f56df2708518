"""Qwen3-MoE: Qwen3 whose every MLP is a sparse mixture (mlp.gate, mlp.experts.{e}.*), with no
shared expert and no sliding window."""

from minitron_jax.families import experts, windows
from minitron_jax.families.family import Family


def tiny(hidden: int, layers: int) -> dict:
  del hidden, layers
  return dict(norm_eps=1e-6, rope_theta=1e6, num_experts=6, num_experts_per_tok=2,
              moe_intermediate_size=32, norm_topk_prob=True)


PRESETS = {
    "qwen3_30b_a3b": dict(
        vocab_size=151936, hidden_size=2048, num_layers=48, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, intermediate_size=6144, num_experts=128,
        num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True, norm_eps=1e-6,
        rope_theta=1e6, max_position_embeddings=40960),
}

QWEN3_MOE = Family(
    name="qwen3_moe", architecture="Qwen3MoeForCausalLM", qk_norm=True, moe=True,
    windows=windows.never_used,
    fields_from_hf=lambda hf: experts.qwen_from_hf(hf, "qwen3_moe"),
    fields_to_hf=lambda config, hf: {**hf, "attention_bias": config.qkv_bias,
                                     **experts.qwen_to_hf(config)},
    refusals=lambda config: [experts.no_shared_expert(config)],
    layer_tensors=experts.qwen_tensors(), tiny=tiny, presets=PRESETS)
