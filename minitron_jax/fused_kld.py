"""Logit distillation loss that never holds the [tokens, vocab] logits of either model.

With vocabularies of 128k+ entries the logits dominate distillation memory: N tokens x V x 4 bytes,
twice (student and teacher), plus the softmax residuals autodiff keeps for the backward pass.
`fused_kld` instead walks the tokens in chunks, and for each chunk computes both models' logits,
the KL contribution, and the gradient w.r.t. the student's final hidden states and LM head right
away (the Liger-kernel trick). Only a few [chunk, V] blocks are ever live; the gradients ([N, Ds]
and [Ds, V], the size of the inputs) are saved as `custom_vjp` residuals and the backward pass
merely scales them by the cotangent. Evaluated without differentiation, the gradient work is
dead code and XLA drops it.

The loss is the mean over counted tokens of forward KL(p_teacher || p_student) with
p = softmax(logits / temperature), where a model's logits may be soft-capped first,
cap * tanh(hidden @ head / cap) (Gemma 2's final logits). It carries no temperature**2 factor: multiply by it yourself if
you want gradient magnitudes independent of the temperature (Hinton et al., 2015). The teacher is a
constant: its inputs get zero cotangents.

`naive_kld` is the straightforward full-logits version, kept as the reference and the benchmark
baseline.
"""

from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp

from minitron_jax.config import ConfigError


def _validate(student_hidden, student_head, teacher_hidden, teacher_head, temperature, mask,
              chunk_size) -> None:
  """One-line ConfigError for every argument mistake a caller can make."""
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
    raise ConfigError(f"chunk_size={chunk_size!r} is invalid; allowed: an integer >= 1")
  if not temperature > 0:  # also rejects NaN
    raise ConfigError(f"temperature={temperature!r} is invalid; allowed: a number > 0")
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


def _token_weights(mask, lead: tuple[int, ...]) -> jax.Array:
  """[N] float32 mask / number of counted tokens; all zeros when no token counts."""
  num_tokens = math.prod(lead)
  if mask is None:
    return jnp.full((num_tokens,), 1.0 / max(num_tokens, 1), jnp.float32)
  counted = jax.lax.stop_gradient(jnp.asarray(mask)).reshape(num_tokens).astype(jnp.float32)
  return counted / jnp.maximum(counted.sum(), 1.0)


def _cap(logits, cap):
  """(cap * tanh(logits / cap), its derivative) or (logits, None) when cap is None."""
  if cap is None:
    return logits, None
  t = jnp.tanh(logits / cap)
  return cap * t, 1.0 - jnp.square(t)


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
  student_logits = _cap(jnp.einsum("...D,DV->...V", student_hidden, student_head,
                                   preferred_element_type=jnp.float32), student_softcap)[0]
  teacher_logits = _cap(jnp.einsum("...D,DV->...V", teacher_hidden, teacher_head,
                                   preferred_element_type=jnp.float32), teacher_softcap)[0]
  student_logits, teacher_logits = student_logits / temperature, teacher_logits / temperature
  log_ps = jax.nn.log_softmax(student_logits, axis=-1)
  log_pt = jax.nn.log_softmax(teacher_logits, axis=-1)
  kl = jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)  # [...]
  return jnp.sum(kl.reshape(-1) * _token_weights(mask, lead))


def _logsumexp(z: jax.Array) -> jax.Array:
  """'CV->C1' log-sum-exp over the vocabulary of finite float32 logits."""
  peak = jnp.max(z, axis=-1, keepdims=True)
  return peak + jnp.log(jnp.sum(jnp.exp(z - peak), axis=-1, keepdims=True))


def _chunked_loss_and_grads(hs, ws, ht, wt, weights, temperature: float, chunk: int,
                            caps: tuple[float | None, float | None] = (None, None)):
  """Loss and student gradients, one [chunk, V] block at a time.

  hs [M,Ds], ws [Ds,V], ht [M,Dt], wt [Dt,V], weights [M] with M a multiple of `chunk`.
  Returns (loss [], d_hs [M,Ds] in hs.dtype, d_ws [Ds,V] in ws.dtype).
  """
  num_chunks = hs.shape[0] // chunk
  xs = (hs.reshape(num_chunks, chunk, -1), ht.reshape(num_chunks, chunk, -1),
        weights.reshape(num_chunks, chunk))

  def step(carry, x):
    loss, d_ws = carry
    hs_c, ht_c, w_c = x  # [C,Ds], [C,Dt], [C]
    zs, slope = _cap(jnp.einsum("CD,DV->CV", hs_c, ws, preferred_element_type=jnp.float32),
                     caps[0])
    zt = _cap(jnp.einsum("CD,DV->CV", ht_c, wt, preferred_element_type=jnp.float32), caps[1])[0]
    zs, zt = zs / temperature, zt / temperature
    # Row log-normalisers [C,1] instead of log-probability blocks: the [C,V] expressions below are
    # elementwise in (zs, zt), so XLA fuses them into their consumers and keeps at most one more
    # [C,V] block (p_t or g) alive besides the two logit blocks.
    lse_s, lse_t = _logsumexp(zs), _logsumexp(zt)  # [C,1]
    pt = jnp.exp(zt - lse_t)
    # sum_v p_t (log p_t - log p_s) = sum_v p_t (zt - zs) + lse_s - lse_t, since sum_v p_t = 1.
    kl = jnp.sum(pt * (zt - zs), axis=-1) + (lse_s - lse_t)[:, 0]  # [C]
    # d loss / d student logits: (p_s - p_t) / tau, weighted per token.
    g = (jnp.exp(zs - lse_s) - pt) * (w_c / temperature)[:, None]  # [C,V] float32
    if slope is not None:  # through the student's soft cap
      g = g * slope
    d_hs_c = jnp.einsum("CV,DV->CD", g, ws, preferred_element_type=jnp.float32)
    d_ws = d_ws + jnp.einsum("CD,CV->DV", hs_c, g, preferred_element_type=jnp.float32)
    return (loss + jnp.sum(w_c * kl), d_ws), d_hs_c.astype(hs.dtype)

  init = (jnp.zeros((), jnp.float32), jnp.zeros(ws.shape, jnp.float32))
  (loss, d_ws), d_hs = jax.lax.scan(step, init, xs)
  return loss, d_hs.reshape(hs.shape), d_ws.astype(ws.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _fused(hs, ws, ht, wt, weights, temperature: float, chunk: int, caps):
  return _chunked_loss_and_grads(hs, ws, ht, wt, weights, temperature, chunk, caps)[0]


def _fused_fwd(hs, ws, ht, wt, weights, temperature, chunk, caps):
  loss, d_hs, d_ws = _chunked_loss_and_grads(hs, ws, ht, wt, weights, temperature, chunk, caps)
  return loss, (d_hs, d_ws)


def _fused_bwd(temperature, chunk, caps, residuals, cotangent):
  del temperature, chunk, caps
  d_hs, d_ws = residuals
  # None: the teacher and the token weights are constants (zero cotangents).
  return ((d_hs * cotangent).astype(d_hs.dtype), (d_ws * cotangent).astype(d_ws.dtype),
          None, None, None)


_fused.defvjp(_fused_fwd, _fused_bwd)


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
  lead = student_hidden.shape[:-1]
  num_tokens = math.prod(lead)
  if num_tokens == 0:
    return jnp.zeros((), jnp.float32)
  chunk = min(int(chunk_size), num_tokens)
  padded = -(-num_tokens // chunk) * chunk
  pad = padded - num_tokens
  hs = jnp.pad(student_hidden.reshape(num_tokens, -1), ((0, pad), (0, 0)))  # [M,Ds]
  ht = jnp.pad(jax.lax.stop_gradient(teacher_hidden).reshape(num_tokens, -1),
               ((0, pad), (0, 0)))  # [M,Dt]
  weights = jnp.pad(_token_weights(mask, lead), (0, pad))  # [M]
  caps = tuple(None if c is None else float(c) for c in (student_softcap, teacher_softcap))
  return _fused(hs, student_head, ht, jax.lax.stop_gradient(teacher_head), weights,
                float(temperature), chunk, caps)
