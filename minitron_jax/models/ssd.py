"""Mamba-2's selective state-space scan (state space duality, SSD) in plain JAX: the chunked form
that training and prefill run, and the token-by-token recurrence that decoding and the tests'
reference run. Both reset the state where a packed row starts a new document.

The recurrence, per head m, with state h [P,N]:
  h_t = exp(dt_t * A_m) * h_{t-1} + dt_t * x_t (outer) B_t,   y_t = h_t . C_t + D_m * x_t
and h_{t-1} taken as zero where position t starts a new document of its row.

The chunked form splits T into chunks of Q positions: inside a chunk the output is a masked
[Q,Q] product (quadratic, like attention); between chunks only the [M,P,N] states travel, by a
`lax.scan` over T / Q chunks. Memory grows as T x Q, never T x T, and the work is matmuls.

Axis letters: B batch, T positions, M mamba heads, P mamba head_dim, G groups (heads of a group
share B and C), R heads per group (M = G x R), N state size, Q chunk length, C chunks; in [Q,Q]
products L is the target position and S the source.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def document_index(segment_ids: jax.Array) -> jax.Array:
  """segment_ids [B,T] -> int32 [B,T]: how many documents start after position 0 up to t.

  Position 0 continues whatever state came in (zeros, or a decode cache), so it is document 0;
  a change of segment id starts the next one. Counting starts, rather than comparing ids,
  keeps two documents apart even where they carry the same id (padding 0 on both sides)."""
  starts = jnp.concatenate([jnp.zeros_like(segment_ids[:, :1], dtype=bool),
                            segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  return jnp.cumsum(starts.astype(jnp.int32), axis=1)


def _segment_sums(a: jax.Array) -> jax.Array:
  """a [..., Q] -> [..., L, S]: sum of a over (S, L] where S <= L, 0 above the diagonal.

  A masked cumulative sum rather than cumsum[L] - cumsum[S]: the difference of two large sums
  loses the digits of a small one."""
  q = a.shape[-1]
  below = jnp.tril(jnp.ones((q, q), bool), -1)
  return jnp.cumsum(jnp.where(below, a[..., :, None], 0.0), axis=-2)


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def ssd_chunked(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array,
                D: jax.Array, segment_ids: jax.Array, *, chunk_size: int,
                initial_state: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """x [B,T,M,P], dt [B,T,M] (after bias, softplus and limits), A [M] (negative), B and C
  [B,T,G,N], D [M], segment_ids [B,T] -> (y [B,T,M,P] float32, final state [B,M,P,N] float32).

  `initial_state` [B,M,P,N]: the state before position 0 (a decode cache); None is zeros."""
  f32 = jnp.float32
  batch, length, heads, head_dim = x.shape
  groups, state = B.shape[-2], B.shape[-1]
  q = chunk_size
  pad = (-length) % q
  chunks = (length + pad) // q
  doc = document_index(segment_ids)
  x, dt, B, C = (t.astype(f32) for t in (x, dt, B, C))
  skip = D.astype(f32)[:, None] * x

  def chunked(t, fill="zero"):
    widths = [(0, 0), (0, pad)] + [(0, 0)] * (t.ndim - 2)
    t = jnp.pad(t, widths, mode="edge" if fill == "edge" else "constant")
    return t.reshape(batch, chunks, q, *t.shape[2:])

  # Padded positions have dt = 0: they add nothing and decay nothing, so the final state is the
  # one after the last real position.
  per_group = heads // groups  # heads are numbered group by group: head m is in group m // R
  xc = chunked(x).reshape(batch, chunks, q, groups, per_group, head_dim)  # [B,C,Q,G,R,P]
  dtc = chunked(dt).reshape(batch, chunks, q, groups, per_group)          # [B,C,Q,G,R]
  Bc, Cc = chunked(B), chunked(C)                      # [B,C,Q,G,N]
  docc = chunked(doc, "edge")                          # [B,C,Q]
  a = dtc * A.astype(f32).reshape(groups, per_group)  # log decay of each step [B,C,Q,G,R]
  a = jnp.moveaxis(a, 2, -1)                           # [B,C,G,R,Q]
  cum = jnp.cumsum(a, axis=-1)
  xdt = xc * dtc[..., None]

  # 1. Inside each chunk: target L sees source S <= L of its own document.
  same_doc = docc[:, :, :, None] == docc[:, :, None, :]                   # [B,C,L,S]
  causal = jnp.tril(jnp.ones((q, q), bool))
  decay = jnp.where(causal & same_doc[:, :, None, None],
                    jnp.exp(_segment_sums(a)), 0.0)                       # [B,C,G,R,L,S]
  scores = jnp.einsum("BCLGN,BCSGN->BCGLS", Cc, Bc)
  y_diag = jnp.einsum("BCGLS,BCGRLS,BCSGRP->BCLGRP", scores, decay, xdt)

  # 2. Each chunk's own contribution to the state at its end, from its last document only.
  last_doc = docc[:, :, -1]                                               # [B,C]
  to_end = jnp.where((docc == last_doc[:, :, None])[:, :, None, None],
                     jnp.exp(cum[..., -1:] - cum), 0.0)                   # [B,C,G,R,Q]
  local = jnp.einsum("BCQGN,BCGRQ,BCQGRP->BCGRPN", Bc, to_end, xdt)

  # 3. Between chunks: the state passes on where the chunk holds no document start.
  before_doc = jnp.concatenate([jnp.zeros_like(last_doc[:, :1]), last_doc[:, :-1]], axis=1)
  carries = (last_doc == before_doc).astype(f32)                          # [B,C]
  chunk_decay = jnp.exp(cum[..., -1])                                     # [B,C,G,R]
  start = (jnp.zeros((batch, groups, per_group, head_dim, state), f32) if initial_state is None
           else initial_state.astype(f32).reshape(batch, groups, per_group, head_dim, state))

  def step(h, inputs):
    own, keep, dec = inputs
    h_next = own + (keep[:, None, None, None, None] * dec[..., None, None]) * h
    return h_next, h

  final, starts = jax.lax.scan(
      step, start, (jnp.moveaxis(local, 1, 0), carries.T, jnp.moveaxis(chunk_decay, 1, 0)))
  starts = jnp.moveaxis(starts, 0, 1)                                     # [B,C,G,R,P,N]

  # 4. The state each chunk starts with, read out where the target is still in its document.
  from_start = jnp.where((docc == before_doc[:, :, None])[:, :, None, None],
                         jnp.exp(cum), 0.0)                               # [B,C,G,R,Q]
  y_off = jnp.einsum("BCLGN,BCGRPN,BCGRL->BCLGRP", Cc, starts, from_start)

  y = (y_diag + y_off).reshape(batch, chunks * q, heads, head_dim)[:, :length] + skip
  return y, final.reshape(batch, heads, head_dim, state)


def ssd_step(h: jax.Array, x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array,
             C: jax.Array, D: jax.Array, reset: jax.Array | None = None
             ) -> tuple[jax.Array, jax.Array]:
  """One position of the recurrence: state h [B,M,P,N], x [B,M,P], dt [B,M], B and C [B,G,N],
  `reset` [B] (this position starts a document) -> (new state, y [B,M,P]), in h's dtype."""
  groups, heads = B.shape[-2], x.shape[-2]
  dtype = h.dtype
  x, dt, A, B, C, D = (t.astype(dtype) for t in (x, dt, A, B, C, D))
  if reset is not None:
    h = jnp.where(reset[:, None, None, None], 0.0, h)
  Bh = jnp.repeat(B, heads // groups, axis=1)          # [B,M,N]: head m reads group m // R
  Ch = jnp.repeat(C, heads // groups, axis=1)
  h = (jnp.exp(dt * A)[..., None, None] * h
       + jnp.einsum("BM,BMP,BMN->BMPN", dt, x, Bh))
  y = jnp.einsum("BMPN,BMN->BMP", h, Ch) + D[:, None] * x
  return h, y


def ssd_sequential(x, dt, A, B, C, D, segment_ids, *, initial_state=None,
                   dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
  """`ssd_chunked`'s contract, one position at a time (`lax.scan` over T) in `dtype`: the
  reference the chunked form is tested and benchmarked against, and the decode path."""
  batch, _, heads, head_dim = x.shape
  h = (jnp.zeros((batch, heads, head_dim, B.shape[-1]), dtype) if initial_state is None
       else initial_state.astype(dtype))
  doc = document_index(segment_ids)
  resets = jnp.concatenate([jnp.zeros_like(doc[:, :1], dtype=bool),
                            doc[:, 1:] != doc[:, :-1]], axis=1)

  def step(h, inputs):
    x_t, dt_t, B_t, C_t, reset_t = inputs
    return ssd_step(h, x_t, dt_t, A, B_t, C_t, D, reset_t)

  final, ys = jax.lax.scan(step, h, [jnp.moveaxis(t, 1, 0) for t in (x, dt, B, C, resets)])
  return jnp.moveaxis(ys, 0, 1), final
