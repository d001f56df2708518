"""Model FLOPs per token, for MFU: matmuls only (norms, softmax and activations are noise).

Forward, per token: 2 x every weight the token passes through (Q/K/V/O, the MLP or the experts it
is routed to, the LM head), plus attention's score and value products, 2 x 2 x seq_len x heads x head_dim per layer
counted over the full (not causally halved) sequence, as PaLM's MFU accounting does. A backward
pass costs twice the forward.
"""

from __future__ import annotations

from minitron_jax.models.config import ModelConfig


def matmul_params(config: ModelConfig) -> int:
  """Weights multiplied per token: the parameters one token computes with
  (`ModelConfig.num_active_params`: a mixture's routed experts only), less an untied embedding
  table, which is looked up, not multiplied. Norm scales and biases stay in (under 0.1%)."""
  lookup = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
  return config.num_active_params() - lookup


def forward_flops_per_token(config: ModelConfig, seq_len: int) -> int:
  attention = 4 * config.num_layers * seq_len * config.num_attention_heads * config.head_dim
  return 2 * matmul_params(config) + attention


def distillation_flops_per_token(student: ModelConfig, teacher: ModelConfig | None,
                                 seq_len: int) -> int:
  """Teacher forward + student forward and backward."""
  teacher_flops = forward_flops_per_token(teacher, seq_len) if teacher is not None else 0
  return teacher_flops + 3 * forward_flops_per_token(student, seq_len)
