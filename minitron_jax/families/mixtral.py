"""Mixtral: Mistral whose every MLP is a sparse mixture (top-2 of 8, renormalised), stored as
block_sparse_moe.gate and block_sparse_moe.experts.{e}.w1 (gate) / w3 (up) / w2 (down)."""

from minitron_jax.families import experts, windows
from minitron_jax.families.family import Family
from minitron_jax.families.mistral import no_biases

_EXPERT_NAMES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def _from_hf(hf) -> dict:
  return dict(num_experts=experts.count(hf, "mixtral"),
              num_experts_per_tok=int(hf.get("num_experts_per_tok", 2)),
              moe_intermediate_size=hf["intermediate_size"], norm_topk_prob=True)


def _to_hf(config, hf):
  return {**hf, "sliding_window": config.sliding_window,
          "num_local_experts": config.num_experts,
          "num_experts_per_tok": config.num_experts_per_tok,
          "intermediate_size": config.moe_intermediate_size}


def _refusals(config):
  yield experts.no_shared_expert(config)
  yield config.norm_topk_prob, "norm_topk_prob=False"


def tiny(hidden: int, layers: int) -> dict:
  """Few enough experts that every one sees tokens in a short test batch."""
  del hidden, layers
  return dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=True,
              rope_theta=1e6)


PRESETS = {
    "mixtral_8x7b": dict(
        vocab_size=32000, hidden_size=4096, num_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, intermediate_size=14336, num_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=14336, norm_topk_prob=True, rope_theta=1e6,
        max_position_embeddings=32768),
}

MIXTRAL = Family(
    name="mixtral", architecture="MixtralForCausalLM", moe=True,
    allows=frozenset({"sliding_window"}), windows=windows.every_layer, bias_rule=no_biases,
    fields_from_hf=_from_hf, fields_to_hf=_to_hf, refusals=_refusals,
    layer_tensors={("moe", "router"): ("block_sparse_moe.gate.weight", 1), **{
        ("moe", ours): (f"block_sparse_moe.experts.{{e}}.{theirs}.weight", ("experts", 1))
        for ours, theirs in _EXPERT_NAMES.items()}},
    tiny=tiny, presets=PRESETS)
