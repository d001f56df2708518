"""What Hugging Face's mixture-of-experts families add to a dense checkpoint: config fields and
per-expert tensor names (hf.py does the rest).

Checkpoints store each expert's projections as separate `Linear` weights (transformers 5 fuses
them in memory and splits them again on save); we stack them on an experts axis.
  mixtral    block_sparse_moe.gate, .experts.{e}.w1 (gate) / w3 (up) / w2 (down)
  qwen2_moe  mlp.gate, mlp.experts.{e}.gate_proj / up_proj / down_proj, mlp.shared_expert.*,
             mlp.shared_expert_gate
  qwen3_moe  as qwen2_moe without the shared expert
"""

from __future__ import annotations

from typing import Any, Mapping

from minitron_jax.models.config import ModelConfig
from minitron_jax.errors import ConfigError

ARCHITECTURES = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}
# Hugging Face fields with no effect on what the model computes, carried through export.
CARRIED_FIELDS = ("router_aux_loss_coef", "router_jitter_noise")

_MIXTRAL_EXPERT = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def config_fields(hf: Mapping[str, Any], family: str) -> dict[str, Any]:
  """ModelConfig's mixture fields from a config.json; refuses dense layers among sparse ones."""
  experts = hf.get("num_local_experts", hf.get("num_experts"))
  if not isinstance(experts, int) or experts < 1:
    raise ConfigError(f"num_experts={experts!r} must be a positive integer for {family}")
  if family == "mixtral":
    width = hf["intermediate_size"]
    return dict(num_experts=experts, num_experts_per_tok=int(hf.get("num_experts_per_tok", 2)),
                moe_intermediate_size=width, norm_topk_prob=True)
  step = hf.get("decoder_sparse_step", 1)
  dense_layers = list(hf.get("mlp_only_layers") or [])
  if step != 1 or dense_layers:
    raise ConfigError(f"decoder_sparse_step={step}, mlp_only_layers={dense_layers} (dense layers "
                      f"among sparse ones) are not supported for {family}; allowed: 1 and []")
  fields = dict(num_experts=experts, num_experts_per_tok=int(hf.get("num_experts_per_tok", 8)),
                moe_intermediate_size=int(hf["moe_intermediate_size"]),
                norm_topk_prob=bool(hf.get("norm_topk_prob", False)))
  if family == "qwen2_moe":
    shared = int(hf.get("shared_expert_intermediate_size", 0))
    if shared < 1:
      raise ConfigError(f"shared_expert_intermediate_size={shared} must be positive for qwen2_moe")
    fields["shared_expert_intermediate_size"] = shared
  return fields


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
  """The config.json fields of the mixture; refuses what the family cannot express."""
  family = config.family
  if family == "qwen2_moe" and not config.shared_expert_intermediate_size:
    raise ConfigError("a qwen2_moe model without a shared expert cannot be expressed as a "
                      "Hugging Face qwen2_moe config")
  if family != "qwen2_moe" and config.shared_expert_intermediate_size:
    raise ConfigError(f"shared_expert_intermediate_size={config.shared_expert_intermediate_size} "
                      f"cannot be expressed as a Hugging Face {family} config")
  if family == "mixtral":
    if not config.norm_topk_prob:
      raise ConfigError("norm_topk_prob=False cannot be expressed as a Hugging Face mixtral config")
    return dict(num_local_experts=config.num_experts,
                num_experts_per_tok=config.num_experts_per_tok,
                intermediate_size=config.moe_intermediate_size)
  fields = dict(num_experts=config.num_experts, num_experts_per_tok=config.num_experts_per_tok,
                moe_intermediate_size=config.moe_intermediate_size,
                norm_topk_prob=config.norm_topk_prob, decoder_sparse_step=1, mlp_only_layers=[])
  if family == "qwen2_moe":
    fields["shared_expert_intermediate_size"] = config.shared_expert_intermediate_size
  return fields


def layer_tensors(family: str) -> dict[tuple[str, ...], tuple[str, Any]]:
  """Our per-layer param path -> (HF name, layout) for the mixture's tensors.

  Layout ("experts", 1): one Linear weight per expert, named with `{e}`, stacked on our experts
  axis; 1: a Linear weight as hf.py maps any other."""
  if family == "mixtral":
    tensors = {("moe", "router"): ("block_sparse_moe.gate.weight", 1)}
    tensors.update({("moe", ours): (f"block_sparse_moe.experts.{{e}}.{theirs}.weight",
                                    ("experts", 1))
                    for ours, theirs in _MIXTRAL_EXPERT.items()})
    return tensors
  tensors = {("moe", "router"): ("mlp.gate.weight", 1)}
  tensors.update({("moe", name): (f"mlp.experts.{{e}}.{name}.weight", ("experts", 1))
                  for name in ("gate_proj", "up_proj", "down_proj")})
  if family == "qwen2_moe":
    tensors.update({("moe", "shared", name): (f"mlp.shared_expert.{name}.weight", 1)
                    for name in ("gate_proj", "up_proj", "down_proj")})
    tensors[("moe", "shared_gate")] = ("mlp.shared_expert_gate.weight", 1)
  return tensors
