"""Logit distillation from a stored teacher: its top-k log-probabilities plus one tail bucket.

A teacher's distribution is kept per token as the log-probabilities a_i of its k most likely
tokens K (indices i), and b = log(1 - sum_K p_i), the log of the mass it puts on every other
token. The student's distribution is read on the same k + 1 outcomes: q_i for i in K and
q_tail = 1 - sum_K q_i. The loss is the forward KL between these two (k + 1)-way distributions,

  KL = sum_K p_i (a_i - log q_i) + p_tail (b - log q_tail),

which is the full-vocabulary forward KL when K is the whole vocabulary (p_tail = 0), and with
fewer tokens never asks the student to match a teacher detail that was not stored. Both use
p = softmax(logits / temperature): the teacher's at the temperature it was stored with.

`sparse_kld` walks the tokens in chunks (chunked_head_loss.py), like fused_kld.py: each chunk's
student logits [C, V] are made, used for the loss and its gradient, and dropped. With
c = 1 - p_tail / q_tail per token, d KL / d z_v is c q_v for a token outside K and q_v - p_v
inside it (z: the student's logits over temperature).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jax.sharding import PartitionSpec as P

from minitron_jax.objectives import head_loss_layout
from minitron_jax.objectives.chunked_head_loss import (WHOLE_VOCAB, VocabShard, chunked_head_loss, logsumexp,
                                            soft_cap_with_slope, token_weights, validate_options)
from minitron_jax.errors import ConfigError


def _log_mass_outside(z: jax.Array, indices: jax.Array, vocab=None) -> jax.Array:
  """z [C,V'] log-probabilities (or logits; V' the device's vocabulary slice), indices [C,k]
  global -> [C] log-sum-exp over the entries not indexed (over every slice): the tail summed
  directly, where 1 - sum(top-k) would cancel to rounding noise when the top-k hold nearly
  everything; -inf (exactly) when they are the whole vocabulary."""
  vocab = vocab or WHOLE_VOCAB(z.shape[-1])
  local, _ = vocab.local_indices(indices, z.shape[-1])
  rows = jnp.arange(z.shape[0])[:, None]
  rest = z.at[rows, local].set(-jnp.inf, mode="drop")
  peak = vocab.max(rest)
  safe_peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
  return safe_peak + jnp.log(vocab.sum(jnp.exp(rest - safe_peak[:, None])))


def teacher_top_k(logits: jax.Array, k: int, temperature: float = 1.0
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """logits [..., V] -> (log-probabilities [..., k] float32, indices [..., k] int32, log tail
  mass [...] float32) of softmax(logits / temperature); the tail is -inf when k = V.

  On a mesh in context each device ranks its own rows; with the vocabulary split, each its own
  slice, and only the k best of every slice travel (a Megatron-style vocab-parallel top-k)."""
  lead, vocab_size = logits.shape[:-1], logits.shape[-1]
  layout = head_loss_layout.choose(lead, vocab_size)
  if layout is None:
    return _top_k_of_rows(logits, k, temperature, WHOLE_VOCAB(vocab_size))

  def per_device(logits):
    width = logits.shape[-1]
    start = 0 if layout.vocab_axis is None else jax.lax.axis_index(layout.vocab_axis) * width
    return _top_k_of_rows(logits, k, temperature, VocabShard(layout.vocab_axis, start, vocab_size))

  rows = layout.rows(len(lead))
  return jax.shard_map(per_device, mesh=layout.mesh, in_specs=P(*rows, layout.vocab_axis),
                       out_specs=(layout.rows(len(lead) + 1),) * 2 + (rows,),
                       check_vma=False)(logits)


def teacher_top_k_of_hidden(hidden: jax.Array, head: jax.Array, k: int, temperature: float = 1.0,
                            *, chunk_size: int = 256, cap: float | None = None
                            ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`teacher_top_k` of the logits soft_cap(hidden [..., D] @ head [D, V], cap), made
  `chunk_size` tokens at a time so that the [tokens, vocab] logits never exist: each device holds
  one chunk's [chunk_size, V'] (V' its vocabulary slice) at a time. The logits are computed as
  `model.logits_from_hidden` computes them (the head in the hidden states' dtype, float32
  accumulation)."""
  validate_options(chunk_size, temperature)
  lead, vocab_size = hidden.shape[:-1], head.shape[-1]
  head = head.astype(hidden.dtype)
  layout = head_loss_layout.choose(lead, vocab_size)

  def tokens(hs, ws, vocab_axis):  # hs [..., D] (this device's tokens), ws [D, V']
    rows = hs.shape[:-1]
    num_tokens = math.prod(rows)
    chunk = min(chunk_size, num_tokens)
    num_chunks = -(-num_tokens // chunk)
    flat = jnp.pad(hs.reshape(num_tokens, hs.shape[-1]),
                   ((0, num_chunks * chunk - num_tokens), (0, 0)))
    start = 0 if vocab_axis is None else jax.lax.axis_index(vocab_axis) * ws.shape[1]
    vocab = VocabShard(vocab_axis, start, vocab_size)

    def one_chunk(hs_c):  # [C,D] -> the chunk's top-k
      logits = jnp.einsum("CD,DV->CV", hs_c, ws, preferred_element_type=jnp.float32)
      return _top_k_of_rows(soft_cap_with_slope(logits, cap)[0], k, temperature, vocab)

    outputs = jax.lax.map(one_chunk, flat.reshape(num_chunks, chunk, hs.shape[-1]))
    return tuple(x.reshape(num_chunks * chunk, *x.shape[2:])[:num_tokens].reshape(
        *rows, *x.shape[2:]) for x in outputs)

  if layout is None:
    return tokens(hidden, head, None)
  return jax.shard_map(lambda hs, ws: tokens(hs, ws, layout.vocab_axis), mesh=layout.mesh,
                       in_specs=(layout.rows(hidden.ndim), layout.head),
                       out_specs=(layout.rows(len(lead) + 1),) * 2 + (layout.rows(len(lead)),),
                       check_vma=False)(hidden, head)


def _top_k_of_rows(logits, k, temperature, vocab: VocabShard):
  """teacher_top_k over the rows and vocabulary slice this device holds."""
  z = logits.astype(jnp.float32) / temperature
  lse = logsumexp(z, vocab)  # [...,1]
  top, indices = jax.lax.top_k(z, min(k, z.shape[-1]))
  indices = indices + vocab.start
  if vocab.axis is not None:  # the k best of the slices' k best
    gather = lambda x: jax.lax.all_gather(x, vocab.axis, axis=x.ndim - 1, tiled=True)  # noqa: E731
    top, chosen = jax.lax.top_k(gather(top), k)
    indices = jnp.take_along_axis(gather(indices), chosen, axis=-1)
  flat_z, flat_indices = z.reshape(-1, z.shape[-1]), indices.reshape(-1, k)
  tail = _log_mass_outside(flat_z, flat_indices, vocab).reshape(lse.shape[:-1]) - lse[..., 0]
  return top - lse, indices.astype(jnp.int32), tail


def _validate(student_hidden, student_head, log_probs, indices, tail, temperature, mask,
              chunk_size) -> None:
  validate_options(chunk_size, temperature)
  if jnp.ndim(student_head) != 2 or jnp.shape(student_hidden)[-1] != jnp.shape(student_head)[0]:
    raise ConfigError(f"student_hidden {tuple(jnp.shape(student_hidden))} and student_head "
                      f"{tuple(jnp.shape(student_head))} do not match; allowed: [..., D], [D, V]")
  lead = tuple(jnp.shape(student_hidden)[:-1])
  if jnp.shape(log_probs) != jnp.shape(indices) or tuple(jnp.shape(log_probs)[:-1]) != lead:
    raise ConfigError(f"teacher top-k shapes {tuple(jnp.shape(log_probs))} / "
                      f"{tuple(jnp.shape(indices))} do not match the tokens {lead}; allowed: "
                      f"{lead + ('k',)} for both")
  if tuple(jnp.shape(tail)) != lead or (mask is not None and tuple(jnp.shape(mask)) != lead):
    raise ConfigError(f"tail {tuple(jnp.shape(tail))} or mask shape does not match the tokens "
                      f"{lead}")
  if jnp.shape(log_probs)[-1] > jnp.shape(student_head)[1]:
    raise ConfigError(f"k={jnp.shape(log_probs)[-1]} exceeds the vocabulary "
                      f"{jnp.shape(student_head)[1]}")


def _sparse_terms(temperature: float, z, per_token, constants, w_c, vocab):
  """One chunk: (Σ weighted KL, d loss / d student logits [C,V'] float32)."""
  del constants
  a, idx, b = per_token  # [C,k] teacher log-probabilities, [C,k] their indices, [C] log tail
  z = z / temperature
  lse = logsumexp(z, vocab)  # [C,1]
  picked, local, _ = vocab.logits_at(z, idx)
  log_q = picked - lse  # [C,k]
  p = jnp.exp(a)
  log_q_tail = _log_mass_outside(z, idx, vocab) - lse[:, 0]  # [C]
  p_tail = jnp.exp(b)
  tail_term = jnp.where(p_tail > 0, p_tail * (b - log_q_tail), 0.0)
  kl = jnp.sum(p * (a - log_q), axis=-1) + tail_term  # [C]
  q = jnp.exp(z - lse)  # [C,V']
  scale = jnp.where(p_tail > 0, 1.0 - p_tail * jnp.exp(-log_q_tail), 1.0)  # c per token
  rows = jnp.arange(z.shape[0])[:, None]
  g = (scale[:, None] * q).at[rows, local].add(
      jnp.exp(log_q) * (1.0 - scale[:, None]) - p, mode="drop")
  g = g * (w_c / temperature)[:, None]
  return jnp.sum(w_c * kl), g


def sparse_kld(student_hidden, student_head, teacher_log_probs, teacher_indices,
               teacher_tail, *, temperature: float = 1.0, mask=None, chunk_size: int = 1024,
               student_softcap: float | None = None) -> jax.Array:
  """Mean over counted tokens of the top-k + tail forward KL (module docstring), fused.

  student_hidden [..., D], student_head [D, V]; teacher_log_probs [..., k] (any float dtype),
  teacher_indices [..., k] int, teacher_tail [...] (log tail mass; -inf: none) as
  `teacher_top_k` makes them; mask [...] (None: all). Differentiable w.r.t. the student only.
  """
  _validate(student_hidden, student_head, teacher_log_probs, teacher_indices, teacher_tail,
            temperature, mask, chunk_size)
  per_token = ((teacher_log_probs.astype(jnp.float32), 0), (teacher_indices.astype(jnp.int32), 0),
               (teacher_tail.astype(jnp.float32), -jnp.inf))
  terms = functools.partial(_sparse_terms, float(temperature))
  return chunked_head_loss(terms, student_hidden, student_head, per_token, (), mask, chunk_size,
                           student_softcap)


def naive_sparse_kld(student_hidden, student_head, teacher_log_probs, teacher_indices,
                     teacher_tail, *, temperature: float = 1.0, mask=None,
                     student_softcap: float | None = None) -> jax.Array:
  """Reference: the same loss from full [N, V] student log-probabilities, by plain autodiff."""
  lead = student_hidden.shape[:-1]
  z = soft_cap_with_slope(jnp.einsum("...D,DV->...V", student_hidden, student_head,
                                     preferred_element_type=jnp.float32),
                          student_softcap)[0] / temperature
  log_q_all = jax.nn.log_softmax(z, axis=-1)
  a = jax.lax.stop_gradient(teacher_log_probs).astype(jnp.float32)
  b = jax.lax.stop_gradient(teacher_tail).astype(jnp.float32)
  log_q = jnp.take_along_axis(log_q_all, teacher_indices, axis=-1)
  outside = jnp.ones_like(log_q_all, bool)
  outside = jnp.put_along_axis(outside, teacher_indices, False, axis=-1, inplace=False)
  q_tail = jnp.sum(jnp.where(outside, jnp.exp(log_q_all), 0.0), axis=-1)
  p_tail = jnp.exp(b)
  safe_q_tail = jnp.where(p_tail > 0, q_tail, 1.0)
  tail = jnp.where(p_tail > 0, p_tail * (b - jnp.log(safe_q_tail)), 0.0)
  kl = jnp.sum(jnp.exp(a) * (a - log_q), axis=-1) + tail
  return jnp.sum(kl.reshape(-1) * token_weights(mask, lead))
