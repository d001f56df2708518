"""Model FLOPs per token, for MFU: matmuls only (norms, softmax and activations are noise).

Forward, per token: 2 x every matmul weight the token passes through (Q/K/V/O, the MLP, the LM
head), plus attention's score and value products, 2 x 2 x seq_len x heads x head_dim per layer
counted over the full (not causally halved) sequence, as PaLM's MFU accounting does. A backward
pass costs twice the forward.
"""

from __future__ import annotations

from minitron_jax.config import ModelConfig


def matmul_params(config: ModelConfig) -> int:
  """Weights multiplied per token: every layer's projections plus the LM head (not the
  embedding lookup)."""
  d, h, f = config.hidden_size, config.head_dim, config.intermediate_size
  n, k = config.num_attention_heads, config.num_key_value_heads
  attention = d * h * (n + 2 * k) + n * h * d
  mlp = d * f * (3 if config.gated_mlp else 2)
  return config.num_layers * (attention + mlp) + d * config.vocab_size


def forward_flops_per_token(config: ModelConfig, seq_len: int) -> int:
  attention = 4 * config.num_layers * seq_len * config.num_attention_heads * config.head_dim
  return 2 * matmul_params(config) + attention


def distillation_flops_per_token(student: ModelConfig, teacher: ModelConfig | None,
                                 seq_len: int) -> int:
  """Teacher forward + student forward and backward."""
  teacher_flops = forward_flops_per_token(teacher, seq_len) if teacher is not None else 0
  return teacher_flops + 3 * forward_flops_per_token(student, seq_len)
