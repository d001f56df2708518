"""What the mixture-of-experts families share: the expert count, Qwen's mixture fields and the
per-expert tensor names.

Checkpoints store each expert's projections as separate `Linear` weights (transformers 5 fuses
them in memory and splits them again on save); we stack them on an experts axis. Layout
("experts", 1): one Linear weight per expert, named with `{e}`; 1: a Linear weight as hf.py maps
any other.
"""

from __future__ import annotations

from typing import Any, Mapping

from minitron_jax.errors import ConfigError

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def count(hf: Mapping[str, Any], family: str) -> int:
  experts = hf.get("num_local_experts", hf.get("num_experts"))
  if not isinstance(experts, int) or experts < 1:
    raise ConfigError(f"num_experts={experts!r} must be a positive integer for {family}")
  return experts


def qwen_from_hf(hf: Mapping[str, Any], family: str) -> dict[str, Any]:
  """Qwen 2/3 MoE's mixture fields; refuses dense layers among sparse ones."""
  experts = count(hf, family)
  step = hf.get("decoder_sparse_step", 1)
  dense_layers = list(hf.get("mlp_only_layers") or [])
  if step != 1 or dense_layers:
    raise ConfigError(f"decoder_sparse_step={step}, mlp_only_layers={dense_layers} (dense layers "
                      f"among sparse ones) are not supported for {family}; allowed: 1 and []")
  return dict(num_experts=experts, num_experts_per_tok=int(hf.get("num_experts_per_tok", 8)),
              moe_intermediate_size=int(hf["moe_intermediate_size"]),
              norm_topk_prob=bool(hf.get("norm_topk_prob", False)))


def qwen_to_hf(config) -> dict[str, Any]:
  return dict(num_experts=config.num_experts, num_experts_per_tok=config.num_experts_per_tok,
              moe_intermediate_size=config.moe_intermediate_size,
              norm_topk_prob=config.norm_topk_prob, decoder_sparse_step=1, mlp_only_layers=[],
              use_sliding_window=False, sliding_window=None)


def qwen_tensors() -> dict[tuple[str, ...], tuple[str, Any]]:
  """mlp.gate, mlp.experts.{e}.gate_proj / up_proj / down_proj."""
  tensors = {("moe", "router"): ("mlp.gate.weight", 1)}
  tensors.update({("moe", name): (f"mlp.experts.{{e}}.{name}.weight", ("experts", 1))
                  for name in PROJECTIONS})
  return tensors


def no_shared_expert(config) -> tuple[bool, str]:
  return (not config.shared_expert_intermediate_size,
          f"shared_expert_intermediate_size={config.shared_expert_intermediate_size}")
