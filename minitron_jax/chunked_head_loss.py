"""A per-token loss on a student's LM-head logits, computed a chunk of tokens at a time so that the
[tokens, vocab] logits never exist, with its gradient taken in the same pass (the Liger-kernel
trick).

Each chunk's student logits [C, V] are made, handed to a loss-specific `chunk_terms` function
that returns the chunk's weighted loss and d loss / d logits, and dropped; the gradients w.r.t.
the student's final hidden states [N, D] and head [D, V] (the size of the inputs) are the
`custom_vjp` residuals, so the backward pass only scales them by the cotangent. Evaluated
without differentiation the gradient work is dead code and XLA drops it.

fused_kld.py (a live teacher's logits) and sparse_kld.py (a stored teacher's top-k) are the two
losses built on it.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Callable

import jax
import jax.numpy as jnp

from minitron_jax.config import ConfigError

# chunk_terms(z [C,V] float32 capped student logits, per-token inputs of the chunk, constants,
# token weights [C]) -> (sum of the chunk's weighted loss [], d loss / d z [C,V] float32).
ChunkTerms = Callable[..., tuple[jax.Array, jax.Array]]


def validate_options(chunk_size, temperature) -> None:
  """One-line ConfigError for a chunk size or temperature either loss would refuse."""
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
    raise ConfigError(f"chunk_size={chunk_size!r} is invalid; allowed: an integer >= 1")
  if not temperature > 0:  # also rejects NaN
    raise ConfigError(f"temperature={temperature!r} is invalid; allowed: a number > 0")


def soft_cap(logits: jax.Array, cap: float | None) -> tuple[jax.Array, jax.Array | None]:
  """(cap * tanh(logits / cap), its derivative) or (logits, None) when cap is None."""
  if cap is None:
    return logits, None
  t = jnp.tanh(logits / cap)
  return cap * t, 1.0 - jnp.square(t)


def logsumexp(z: jax.Array) -> jax.Array:
  """'...V->...1' log-sum-exp over the vocabulary of finite float32 logits."""
  peak = jnp.max(z, axis=-1, keepdims=True)
  return peak + jnp.log(jnp.sum(jnp.exp(z - peak), axis=-1, keepdims=True))


def token_weights(mask, lead: tuple[int, ...]) -> jax.Array:
  """[N] float32 mask / number of counted tokens; all zeros when no token counts."""
  num_tokens = math.prod(lead)
  if mask is None:
    return jnp.full((num_tokens,), 1.0 / max(num_tokens, 1), jnp.float32)
  counted = jax.lax.stop_gradient(jnp.asarray(mask)).reshape(num_tokens).astype(jnp.float32)
  return counted / jnp.maximum(counted.sum(), 1.0)


def _loss_and_grads(chunk_terms, hs, ws, per_token, constants, weights, chunk, cap):
  """hs [M,D], ws [D,V], per_token: arrays [M,...], weights [M], M a multiple of `chunk`.
  Returns (loss [], d_hs [M,D] in hs.dtype, d_ws [D,V] in ws.dtype)."""
  num_chunks = hs.shape[0] // chunk
  split = lambda x: x.reshape(num_chunks, chunk, *x.shape[1:])

  def step(carry, x):
    loss, d_ws = carry
    hs_c, per_token_c, w_c = x
    z, slope = soft_cap(jnp.einsum("CD,DV->CV", hs_c, ws, preferred_element_type=jnp.float32),
                        cap)
    chunk_loss, g = chunk_terms(z, per_token_c, constants, w_c)  # g: d loss / d z [C,V]
    if slope is not None:  # through the soft cap
      g = g * slope
    d_hs_c = jnp.einsum("CV,DV->CD", g, ws, preferred_element_type=jnp.float32)
    d_ws = d_ws + jnp.einsum("CD,CV->DV", hs_c, g, preferred_element_type=jnp.float32)
    return (loss + chunk_loss, d_ws), d_hs_c.astype(hs.dtype)

  init = (jnp.zeros((), jnp.float32), jnp.zeros(ws.shape, jnp.float32))
  xs = (split(hs), tuple(map(split, per_token)), split(weights))
  (loss, d_ws), d_hs = jax.lax.scan(step, init, xs)
  return loss, d_hs.reshape(hs.shape), d_ws.astype(ws.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 6, 7))
def _fused(chunk_terms, hs, ws, per_token, constants, weights, chunk, cap):
  return _loss_and_grads(chunk_terms, hs, ws, per_token, constants, weights, chunk, cap)[0]


def _fused_fwd(chunk_terms, hs, ws, per_token, constants, weights, chunk, cap):
  loss, d_hs, d_ws = _loss_and_grads(chunk_terms, hs, ws, per_token, constants, weights, chunk,
                                     cap)
  return loss, (d_hs, d_ws)


def _fused_bwd(chunk_terms, chunk, cap, residuals, cotangent):
  del chunk_terms, chunk, cap
  d_hs, d_ws = residuals
  # None: the per-token inputs, constants (a teacher) and token weights get zero cotangents.
  return ((d_hs * cotangent).astype(d_hs.dtype), (d_ws * cotangent).astype(d_ws.dtype),
          None, None, None)


_fused.defvjp(_fused_fwd, _fused_bwd)


def chunked_head_loss(chunk_terms: ChunkTerms, student_hidden: jax.Array, student_head: jax.Array,
                      per_token: tuple[tuple[jax.Array, float], ...], constants: tuple, mask,
                      chunk_size: int, student_softcap: float | None) -> jax.Array:
  """Sum over the tokens of `chunk_terms`' weighted loss, `chunk_size` tokens at a time.

  student_hidden [..., D] and student_head [D, V]; per_token: (array [..., *rest], padding value)
  pairs with the hidden states' token dims, chunked alongside them; constants: arrays every chunk
  sees whole; mask [...] (None: every token) gives the token weights, which sum to one over the
  counted tokens. The chunk shrinks to N when N is smaller, and the last one is padded with
  uncounted tokens. Differentiable w.r.t. the student hidden states and head only.
  """
  lead = student_hidden.shape[:-1]
  num_tokens = math.prod(lead)
  if num_tokens == 0:
    return jnp.zeros((), jnp.float32)
  chunk = min(int(chunk_size), num_tokens)
  pad = -(-num_tokens // chunk) * chunk - num_tokens

  def flat(x, fill=0):  # [..., *rest] -> [M, *rest]
    x = x.reshape(num_tokens, *x.shape[len(lead):])
    return jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1), constant_values=fill)

  per_token = tuple(flat(jax.lax.stop_gradient(x), fill) for x, fill in per_token)
  constants = tuple(jax.lax.stop_gradient(c) for c in constants)
  weights = jnp.pad(token_weights(mask, lead), (0, pad))
  cap = None if student_softcap is None else float(student_softcap)
  return _fused(chunk_terms, flat(student_hidden), student_head, per_token, constants, weights,
                chunk, cap)
