"""Qwen2-MoE: Qwen2's query / key / value biases and a sparse mixture beside one shared expert,
whose output a sigmoid gate scales (mlp.shared_expert.*, mlp.shared_expert_gate)."""

from minitron_jax.errors import ConfigError
from minitron_jax.families import experts, windows
from minitron_jax.families.family import Family


def _from_hf(hf) -> dict:
  shared = int(hf.get("shared_expert_intermediate_size", 0))
  if shared < 1:
    raise ConfigError(f"shared_expert_intermediate_size={shared} must be positive for qwen2_moe")
  return {**experts.qwen_from_hf(hf, "qwen2_moe"), "shared_expert_intermediate_size": shared}


def _to_hf(config, hf):
  return {**hf, **experts.qwen_to_hf(config), "qkv_bias": config.qkv_bias,
          "shared_expert_intermediate_size": config.shared_expert_intermediate_size}


def _bias_rule(config) -> tuple[bool, str]:
  return (not config.o_bias and not config.mlp_bias,
          f"o_bias={config.o_bias}, mlp_bias={config.mlp_bias}")


def tiny(hidden: int, layers: int) -> dict:
  del hidden, layers
  return dict(qkv_bias=True, norm_eps=1e-6, rope_theta=1e6, num_experts=4, num_experts_per_tok=2,
              moe_intermediate_size=32, shared_expert_intermediate_size=48)


QWEN2_MOE = Family(
    name="qwen2_moe", architecture="Qwen2MoeForCausalLM", moe=True, windows=windows.never_used,
    biases=lambda hf: (bool(hf.get("qkv_bias", True)), False), bias_rule=_bias_rule,
    fields_from_hf=_from_hf, fields_to_hf=_to_hf,
    refusals=lambda config: [(bool(config.shared_expert_intermediate_size),
                              "a qwen2_moe model without a shared expert")],
    layer_tensors={
        **experts.qwen_tensors(),
        **{("moe", "shared", name): (f"mlp.shared_expert.{name}.weight", 1)
           for name in experts.PROJECTIONS},
        ("moe", "shared_gate"): ("mlp.shared_expert_gate.weight", 1)},
    tiny=tiny)
