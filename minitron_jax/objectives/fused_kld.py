"""Logit distillation loss that never holds the [tokens, vocab] logits of either model.

With vocabularies of 128k+ entries the logits dominate distillation memory: N tokens x V x 4 bytes,
twice (student and teacher), plus the softmax residuals autodiff keeps for the backward pass.
`fused_kld` instead walks the tokens in chunks (chunked_head_loss.py), and for each chunk
computes both models' logits, the KL contribution and its gradient right away: only a few
[chunk, V] blocks are ever live.

The loss is the mean over counted tokens of forward KL(p_teacher || p_student) with
p = softmax(logits / temperature), where a model's logits may be soft-capped first,
cap * tanh(hidden @ head / cap) (Gemma 2's final logits). It carries no temperature**2 factor:
multiply by it yourself if you want gradient magnitudes independent of the temperature (Hinton et
al., 2015). The teacher is a constant: its inputs get zero cotangents.

`naive_kld` is the straightforward full-logits version, kept as the reference and the benchmark
baseline.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from minitron_jax.objectives.chunked_head_loss import (chunked_head_loss, logsumexp, soft_cap_with_slope,
                                            token_weights, validate_options)
from minitron_jax.errors import ConfigError


def _validate(student_hidden, student_head, teacher_hidden, teacher_head, temperature, mask,
              chunk_size) -> None:
  """One-line ConfigError for every argument mistake a caller can make."""
  validate_options(chunk_size, temperature)
  for name, head in (("student_head", student_head), ("teacher_head", teacher_head)):
    if jnp.ndim(head) != 2:
      raise ConfigError(f"{name} shape {tuple(jnp.shape(head))} is invalid; allowed: [D, V]")
  for name, hidden, head in (("student", student_hidden, student_head),
                             ("teacher", teacher_hidden, teacher_head)):
    if jnp.ndim(hidden) < 1 or jnp.shape(hidden)[-1] != jnp.shape(head)[0]:
      raise ConfigError(f"{name}_hidden shape {tuple(jnp.shape(hidden))} does not match "
                        f"{name}_head shape {tuple(jnp.shape(head))}; "
                        "allowed: [..., D] with [D, V]")
  if jnp.shape(student_head)[1] != jnp.shape(teacher_head)[1]:
    raise ConfigError(f"vocab sizes differ: student_head {tuple(jnp.shape(student_head))} vs "
                      f"teacher_head {tuple(jnp.shape(teacher_head))}; allowed: equal V")
  lead = jnp.shape(student_hidden)[:-1]
  if jnp.shape(teacher_hidden)[:-1] != lead:
    raise ConfigError(f"teacher_hidden shape {tuple(jnp.shape(teacher_hidden))} has leading dims "
                      f"different from student_hidden {tuple(jnp.shape(student_hidden))}; "
                      "allowed: equal token dims")
  if mask is not None and jnp.shape(mask) != lead:
    raise ConfigError(f"mask shape {tuple(jnp.shape(mask))} is invalid; allowed: {tuple(lead)} "
                      "(the hidden states' token dims)")


def naive_kld(student_hidden, student_head, teacher_hidden, teacher_head, *,
              temperature: float = 1.0, mask=None, chunk_size: int = 1024,
              student_softcap: float | None = None, teacher_softcap: float | None = None
              ) -> jax.Array:
  """Reference: full [N, V] float32 logits of both models, gradients by plain autodiff.

  `chunk_size` is validated and otherwise ignored, so the two functions are interchangeable.
  """
  _validate(student_hidden, student_head, teacher_hidden, teacher_head, temperature, mask,
            chunk_size)
  lead = student_hidden.shape[:-1]
  teacher_hidden = jax.lax.stop_gradient(teacher_hidden)
  teacher_head = jax.lax.stop_gradient(teacher_head)
  student_logits = soft_cap_with_slope(
      jnp.einsum("...D,DV->...V", student_hidden, student_head,
                 preferred_element_type=jnp.float32), student_softcap)[0]
  teacher_logits = soft_cap_with_slope(
      jnp.einsum("...D,DV->...V", teacher_hidden, teacher_head,
                 preferred_element_type=jnp.float32), teacher_softcap)[0]
  student_logits, teacher_logits = student_logits / temperature, teacher_logits / temperature
  log_ps = jax.nn.log_softmax(student_logits, axis=-1)
  log_pt = jax.nn.log_softmax(teacher_logits, axis=-1)
  kl = jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)  # [...]
  return jnp.sum(kl.reshape(-1) * token_weights(mask, lead))


def _kld_terms(temperature: float, teacher_cap: float | None, zs, per_token, constants, w_c,
               vocab):
  """One chunk of the forward KL: (its weighted sum, d loss / d student logits [C,V'])."""
  (ht_c,), (wt,) = per_token, constants  # [C,Dt], [Dt,V'] (the device's vocabulary slice)
  zt = soft_cap_with_slope(
      jnp.einsum("CD,DV->CV", ht_c, wt, preferred_element_type=jnp.float32), teacher_cap)[0]
  zs, zt = zs / temperature, zt / temperature
  # Row log-normalisers [C,1] instead of log-probability blocks: the [C,V] expressions below are
  # elementwise in (zs, zt), so XLA fuses them into their consumers and keeps at most one more
  # [C,V] block (p_t or g) alive besides the two logit blocks.
  lse_s, lse_t = logsumexp(zs, vocab), logsumexp(zt, vocab)  # [C,1]
  pt = jnp.exp(zt - lse_t)
  # sum_v p_t (log p_t - log p_s) = sum_v p_t (zt - zs) + lse_s - lse_t, since sum_v p_t = 1.
  kl = vocab.sum(pt * (zt - zs)) + (lse_s - lse_t)[:, 0]  # [C]
  # d loss / d student logits: (p_s - p_t) / tau, weighted per token.
  g = (jnp.exp(zs - lse_s) - pt) * (w_c / temperature)[:, None]  # [C,V'] float32
  return jnp.sum(w_c * kl), g


def fused_kld(student_hidden, student_head, teacher_hidden, teacher_head, *,
              temperature: float = 1.0, mask=None, chunk_size: int = 1024,
              student_softcap: float | None = None, teacher_softcap: float | None = None
              ) -> jax.Array:
  """Mean over counted tokens of KL(p_teacher || p_student), without [N, V] logits.

  student_hidden [..., Ds] and teacher_hidden [..., Dt] are final (post-norm) hidden states with
  equal token dims; student_head [Ds, V] and teacher_head [Dt, V] are LM-head kernels
  (logits = hidden @ head). mask [...] selects the counted tokens (None: all). Returns a float32
  scalar, 0 when no token counts; no temperature**2 factor. Tokens are processed `chunk_size` at
  a time (the chunk shrinks to N when N is smaller; the last one is padded with uncounted tokens).
  Differentiable w.r.t. the student inputs only; gradients come back in the inputs' dtypes.
  `temperature`, `chunk_size` and the soft caps (None: uncapped logits) are Python numbers
  (static under jit).
  """
  _validate(student_hidden, student_head, teacher_hidden, teacher_head, temperature, mask,
            chunk_size)
  teacher_cap = None if teacher_softcap is None else float(teacher_softcap)
  terms = functools.partial(_kld_terms, float(temperature), teacher_cap)
  return chunked_head_loss(terms, student_hidden, student_head, ((teacher_hidden, 0),),
                           (teacher_head,), mask, chunk_size, student_softcap)
