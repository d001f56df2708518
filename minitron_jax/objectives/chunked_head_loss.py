"""A per-token loss on a student's LM-head logits, computed a chunk of tokens at a time so that the
[tokens, vocab] logits never exist, with its gradient taken in the same pass (the Liger-kernel
trick), and on a mesh each device doing only its share.

Each chunk's student logits [C, V] are made, handed to a loss-specific `chunk_terms` function
that returns the chunk's weighted loss and d loss / d logits, and dropped; the gradients w.r.t.
the student's final hidden states [N, D] and head [D, V] (the size of the inputs) are the
`custom_vjp` residuals, so the backward pass only scales them by the cotangent. Evaluated
without differentiation the gradient work is dead code and XLA drops it.

With a mesh in context (`jax.set_mesh`) the chunk loop runs under `jax.shard_map`
(head_loss_layout.py): each device walks only the tokens of its batch shard, so the loss costs
1/devices of the single-device work instead of GSPMD gathering every token's hidden states onto
every device. When the mesh's `tensor` axis splits the vocabulary, each device also makes only
its vocabulary slice of every chunk's logits, and `chunk_terms` combines its log-sum-exps and
vocabulary sums across the slices (`VocabShard`, Megatron's vocab-parallel cross-entropy).

fused_kld.py (a live teacher's logits) and sparse_kld.py (a stored teacher's top-k) are the two
losses built on it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from minitron_jax.objectives import head_loss_layout
from minitron_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class VocabShard:
  """Which slice of the vocabulary a device's logits hold: [start, start + width) of `size`.

  axis: the mesh axis the vocabulary is split over (None: whole, start 0). `sum` and `max` reduce
  over the vocabulary across slices, so a `chunk_terms` written with them is correct either way.
  """

  axis: str | None
  start: jax.Array | int
  size: int

  def across(self, x: jax.Array) -> jax.Array:
    """Adds up per-slice values elementwise over every slice."""
    return x if self.axis is None else jax.lax.psum(x, self.axis)

  def sum(self, x: jax.Array, axis: int = -1, keepdims: bool = False) -> jax.Array:
    return self.across(jnp.sum(x, axis=axis, keepdims=keepdims))

  def max(self, x: jax.Array, axis: int = -1, keepdims: bool = False) -> jax.Array:
    local = jnp.max(x, axis=axis, keepdims=keepdims)
    return local if self.axis is None else jax.lax.pmax(local, self.axis)

  def local_indices(self, indices: jax.Array, width: int) -> tuple[jax.Array, jax.Array]:
    """Global vocabulary indices -> (indices into this slice, whether each lies in it). Indices
    outside the slice become `width`, one past its end, which gathers clip and scatters with
    mode='drop' skip."""
    local = indices - self.start
    inside = (local >= 0) & (local < width)
    return jnp.where(inside, local, width), inside

  def logits_at(self, z: jax.Array, indices: jax.Array
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """z [C,V'] (this slice's logits), indices [C,k] global ids -> (z at each index [C,k], taken
    from the slice that holds it: the others add zero; the local indices and whether each lies
    in this slice, as local_indices gives them)."""
    local, inside = self.local_indices(indices, z.shape[-1])
    picked = jnp.where(inside, jnp.take_along_axis(z, local, axis=1, mode="clip"), 0.0)
    return self.across(picked), local, inside


WHOLE_VOCAB = lambda size: VocabShard(None, 0, size)  # noqa: E731  (the one-device case)

# chunk_terms(z [C,V'] float32 capped student logits (V' = the device's vocabulary slice),
# per-token inputs of the chunk, constants, token weights [C], VocabShard)
#   -> (sum of the chunk's weighted loss [], d loss / d z [C,V'] float32).
ChunkTerms = Callable[..., tuple[jax.Array, jax.Array]]


def validate_options(chunk_size, temperature) -> None:
  """One-line ConfigError for a chunk size or temperature either loss would refuse."""
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
    raise ConfigError(f"chunk_size={chunk_size!r} is invalid; allowed: an integer >= 1")
  if not temperature > 0:  # also rejects NaN
    raise ConfigError(f"temperature={temperature!r} is invalid; allowed: a number > 0")


def soft_cap_with_slope(logits: jax.Array, cap: float | None
                        ) -> tuple[jax.Array, jax.Array | None]:
  """(cap * tanh(logits / cap), its derivative) or (logits, None) when cap is None."""
  if cap is None:
    return logits, None
  t = jnp.tanh(logits / cap)
  return cap * t, 1.0 - jnp.square(t)


def logsumexp(z: jax.Array, vocab: VocabShard | None = None) -> jax.Array:
  """'...V->...1' log-sum-exp over the vocabulary of finite float32 logits (all slices of it)."""
  vocab = vocab or WHOLE_VOCAB(z.shape[-1])
  peak = vocab.max(z, keepdims=True)
  return peak + jnp.log(vocab.sum(jnp.exp(z - peak), keepdims=True))


def token_weights(mask, lead: tuple[int, ...]) -> jax.Array:
  """[N] float32 mask / number of counted tokens; all zeros when no token counts."""
  num_tokens = math.prod(lead)
  if mask is None:
    return jnp.full((num_tokens,), 1.0 / max(num_tokens, 1), jnp.float32)
  counted = jax.lax.stop_gradient(jnp.asarray(mask)).reshape(num_tokens).astype(jnp.float32)
  return counted / jnp.maximum(counted.sum(), 1.0)


def _scan_chunks(chunk_terms, hs, ws, per_token, constants, weights, chunk, cap, vocab):
  """hs [M,D], ws [D,V'], per_token: arrays [M,...], weights [M], M a multiple of `chunk`.
  Returns (loss [], d_hs [M,D] float32, d_ws [D,V'] float32), summed over these tokens."""
  num_chunks = hs.shape[0] // chunk
  split = lambda x: x.reshape(num_chunks, chunk, *x.shape[1:])

  def step(carry, x):
    loss, d_ws = carry
    hs_c, per_token_c, w_c = x
    z, slope = soft_cap_with_slope(
        jnp.einsum("CD,DV->CV", hs_c, ws, preferred_element_type=jnp.float32), cap)
    chunk_loss, g = chunk_terms(z, per_token_c, constants, w_c, vocab)  # g: d loss / d z [C,V']
    if slope is not None:  # through the soft cap
      g = g * slope
    d_hs_c = jnp.einsum("CV,DV->CD", g, ws, preferred_element_type=jnp.float32)
    d_hs_c = vocab.across(d_hs_c)  # each vocabulary slice holds part of the sum over V
    d_ws = d_ws + jnp.einsum("CD,CV->DV", hs_c, g, preferred_element_type=jnp.float32)
    return (loss + chunk_loss, d_ws), d_hs_c

  init = (jnp.zeros((), jnp.float32), jnp.zeros(ws.shape, jnp.float32))
  xs = (split(hs), tuple(map(split, per_token)), split(weights))
  (loss, d_ws), d_hs = jax.lax.scan(step, init, xs)
  return loss, d_hs.reshape(hs.shape), d_ws


@dataclasses.dataclass(frozen=True)
class _Static:
  """The hashable settings of one call (custom_vjp's non-differentiable arguments)."""

  chunk_size: int
  cap: float | None
  fills: tuple  # per-token input -> the value its padding rows take
  vocab_size: int
  layout: head_loss_layout.Layout | None


def _tokens_loss_and_grads(chunk_terms, static: _Static, vocab_axis, hs, ws, per_token,
                           constants, weights):
  """The loss over the tokens of hs [..., D] (all of them, or one device's under shard_map):
  (loss [], d_hs [..., D] float32, d_ws [D, V'] float32)."""
  lead = hs.shape[:-1]
  num_tokens = math.prod(lead)
  chunk = min(static.chunk_size, num_tokens)
  pad = -(-num_tokens // chunk) * chunk - num_tokens

  def flat(x, fill=0):  # [..., *rest] -> [M, *rest]
    x = x.reshape(num_tokens, *x.shape[len(lead):])
    return jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1), constant_values=fill)

  start = 0 if vocab_axis is None else jax.lax.axis_index(vocab_axis) * ws.shape[1]
  vocab = VocabShard(vocab_axis, start, static.vocab_size)
  per_token = tuple(flat(x, fill) for x, fill in zip(per_token, static.fills))
  loss, d_hs, d_ws = _scan_chunks(chunk_terms, flat(hs), ws, per_token, constants, flat(weights),
                                  chunk, static.cap, vocab)
  return loss, d_hs[:num_tokens].reshape(hs.shape), d_ws


def _loss_and_grads(chunk_terms, static: _Static, hs, ws, per_token, constants, weights):
  """(loss [], d_hs in hs.dtype, d_ws in ws.dtype) over every token, one device's share each on
  a mesh."""
  layout = static.layout
  if layout is None:
    loss, d_hs, d_ws = _tokens_loss_and_grads(chunk_terms, static, None, hs, ws, per_token,
                                              constants, weights)
  else:
    def per_device(hs, ws, per_token, constants, weights):
      loss, d_hs, d_ws = _tokens_loss_and_grads(chunk_terms, static, layout.vocab_axis, hs, ws,
                                                per_token, constants, weights)
      # Every device summed its own tokens: the loss and the head's gradient add up over them.
      return layout.sum_over_tokens(loss), d_hs, layout.sum_over_tokens(d_ws)

    loss, d_hs, d_ws = jax.shard_map(
        per_device, mesh=layout.mesh,
        in_specs=(layout.rows(hs.ndim), layout.head, tuple(layout.rows(x.ndim) for x in per_token),
                  tuple(layout.head for _ in constants), layout.token_spec),
        out_specs=(P(), layout.rows(hs.ndim), layout.head),
        check_vma=False)(hs, ws, per_token, constants, weights)
  return loss, d_hs.astype(hs.dtype), d_ws.astype(ws.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fused(chunk_terms, static, hs, ws, per_token, constants, weights):
  return _loss_and_grads(chunk_terms, static, hs, ws, per_token, constants, weights)[0]


def _fused_fwd(chunk_terms, static, hs, ws, per_token, constants, weights):
  loss, d_hs, d_ws = _loss_and_grads(chunk_terms, static, hs, ws, per_token, constants, weights)
  return loss, (d_hs, d_ws)


def _fused_bwd(chunk_terms, static, residuals, cotangent):
  del chunk_terms, static
  d_hs, d_ws = residuals
  # None: the per-token inputs, constants (a teacher) and token weights get zero cotangents.
  return ((d_hs * cotangent).astype(d_hs.dtype), (d_ws * cotangent).astype(d_ws.dtype),
          None, None, None)


_fused.defvjp(_fused_fwd, _fused_bwd)


def chunked_head_loss(chunk_terms: ChunkTerms, student_hidden: jax.Array, student_head: jax.Array,
                      per_token: tuple[tuple[jax.Array, float], ...], constants: tuple, mask,
                      chunk_size: int, student_softcap: float | None, *,
                      vocabulary_first: bool = False) -> jax.Array:
  """Sum over the tokens of `chunk_terms`' weighted loss, `chunk_size` tokens at a time.

  student_hidden [..., D] and student_head [D, V]; per_token: (array [..., *rest], padding value)
  pairs with the hidden states' token dims, chunked alongside them; constants: arrays [..., V]
  every chunk sees whole (split over the vocabulary like the head on a mesh); mask [...] (None:
  every token) gives the token weights, which sum to one over all counted tokens. The chunk
  shrinks to the tokens there are (per device on a mesh), and the last one is padded with
  uncounted tokens. Differentiable w.r.t. the student hidden states and head only.
  vocabulary_first: on a mesh that splits the tokens but not the vocabulary, split the vocabulary
  instead (head_loss_layout.choose), for small batches whose head is the larger operand.
  """
  lead = student_hidden.shape[:-1]
  if math.prod(lead) == 0:
    return jnp.zeros((), jnp.float32)
  per_token_arrays = tuple(jax.lax.stop_gradient(x) for x, _ in per_token)
  constants = tuple(jax.lax.stop_gradient(c) for c in constants)
  weights = token_weights(mask, lead).reshape(lead)  # normalised over every device's tokens
  vocab_size = student_head.shape[1]
  static = _Static(int(chunk_size), None if student_softcap is None else float(student_softcap),
                   tuple(fill for _, fill in per_token), vocab_size,
                   head_loss_layout.choose(lead, vocab_size, vocabulary_first=vocabulary_first))
  return _fused(chunk_terms, static, student_hidden, student_head, per_token_arrays, constants,
                weights)
