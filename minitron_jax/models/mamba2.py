"""The Mamba-2 mixer (Nemotron-H's `linear_attention` block): the input projections, the causal
depthwise convolution, the selective scan (ssd.py), the per-group gated RMSNorm and the output
projection, as transformers' NemotronHMamba2Mixer computes them.

The fused in_proj of a checkpoint ([z | x | B | C | dt] rows) is kept as five kernels, and the
convolution as three, so that pruning slices each along a named axis: `mamba_heads` (M),
`mamba_head_dim` (P), `mamba_groups` (G) and `mamba_state` (N). checkpoints split and join them.

Packed rows: the convolution window and the scan state both stop at a document start, so a row
of several documents equals each document run alone.

Axis letters: B batch, T positions, D hidden, W convolution taps, M heads, P head_dim,
G groups, N state size.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from minitron_jax.models import layers, ssd
from minitron_jax.models.config import Mamba2Config


class MambaCache(NamedTuple):
  """What a mixer carries from one generation call to the next: the last W-1 convolution inputs
  of each branch (zeros before a sequence starts) and the scan state, float32."""

  conv_x: jax.Array  # [B,W-1,M,P]
  conv_B: jax.Array  # [B,W-1,G,N]
  conv_C: jax.Array  # [B,W-1,G,N]
  ssm: jax.Array  # [B,M,P,N]

  @classmethod
  def zeros(cls, config: Mamba2Config, batch: int) -> "MambaCache":
    w, m, p = config.conv_kernel - 1, config.num_heads, config.head_dim
    g, n = config.num_groups, config.state_size
    f32 = jnp.float32
    return cls(jnp.zeros((batch, w, m, p), f32), jnp.zeros((batch, w, g, n), f32),
               jnp.zeros((batch, w, g, n), f32), jnp.zeros((batch, m, p, n), f32))


def causal_conv(inputs: jax.Array, kernel: jax.Array, bias: jax.Array | None,
                doc: jax.Array, history: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Depthwise causal convolution over T that does not reach across a document start.

  inputs [B,T,...], kernel [W,...] (tap W-1 multiplies the current position, as torch's conv1d
  with W-1 left padding), bias [...] or None, doc [B,T] (ssd.document_index), history
  [B,W-1,...] (the inputs before position 0, document 0) -> (outputs [B,T,...] in the inputs'
  dtype, the new history: the last W-1 inputs of the last position's document, zeros before it).
  """
  taps = kernel.shape[0]
  length = inputs.shape[1]
  padded = jnp.concatenate([history.astype(inputs.dtype), inputs], axis=1)    # [B,W-1+T,...]
  padded_doc = jnp.concatenate([jnp.zeros_like(doc[:, :1]).repeat(taps - 1, 1), doc], axis=1)
  extra = (1,) * (inputs.ndim - 2)
  out = jnp.zeros(inputs.shape, jnp.float32)
  for tap in range(taps):
    source = jax.lax.dynamic_slice_in_dim(padded, tap, length, axis=1)
    same = jax.lax.dynamic_slice_in_dim(padded_doc, tap, length, axis=1) == doc
    out = out + jnp.where(same.reshape(same.shape + extra), source, 0).astype(jnp.float32) * (
        kernel[tap].astype(jnp.float32))
  if bias is not None:
    out = out + bias.astype(jnp.float32)
  last = padded[:, -(taps - 1):] if taps > 1 else padded[:, :0]
  keep = padded_doc[:, -(taps - 1):] == doc[:, -1:] if taps > 1 else padded_doc[:, :0]
  new_history = jnp.where(keep.reshape(keep.shape + extra), last, 0).astype(history.dtype)
  return out.astype(inputs.dtype), new_history


def gated_group_norm(y: jax.Array, gate: jax.Array, scale: jax.Array, groups: int,
                     eps: float) -> jax.Array:
  """RMSNorm of y * silu(gate) over each group's heads, times scale; y, gate [B,T,M,P], scale
  [M,P] -> float32 [B,T,M,P]. Group g holds heads g*M/G .. (g+1)*M/G - 1, all their P channels."""
  b, t, m, p = y.shape
  h = y.astype(jnp.float32) * jax.nn.silu(gate.astype(jnp.float32))
  grouped = h.reshape(b, t, groups, (m // groups) * p)
  grouped = grouped * jax.lax.rsqrt(jnp.mean(jnp.square(grouped), -1, keepdims=True) + eps)
  return grouped.reshape(b, t, m, p) * scale.astype(jnp.float32)


class Mamba2Mixer(nnx.Module):
  """in_proj -> causal conv + activation on (x, B, C) -> selective scan with D skip -> gated
  group RMSNorm with z -> out_proj."""

  def __init__(self, config: Mamba2Config, hidden_size: int, norm_eps: float, param_dtype,
               rngs: nnx.Rngs):
    d, m, p = hidden_size, config.num_heads, config.head_dim
    g, n, w = config.num_groups, config.state_size, config.conv_kernel
    dtype = jnp.dtype(param_dtype)
    self.config, self.norm_eps = config, norm_eps
    heads, groups = ("mamba_heads", "mamba_head_dim"), ("mamba_groups", "mamba_state")
    self.in_z = layers.param(rngs, (d, m, p), ("embed",) + heads, dtype)
    self.in_x = layers.param(rngs, (d, m, p), ("embed",) + heads, dtype)
    self.in_B = layers.param(rngs, (d, g, n), ("embed",) + groups, dtype)
    self.in_C = layers.param(rngs, (d, g, n), ("embed",) + groups, dtype)
    self.in_dt = layers.param(rngs, (d, m), ("embed", "mamba_heads"), dtype)
    self.conv_x = layers.param(rngs, (w, m, p), ("mamba_conv",) + heads, dtype)
    self.conv_B = layers.param(rngs, (w, g, n), ("mamba_conv",) + groups, dtype)
    self.conv_C = layers.param(rngs, (w, g, n), ("mamba_conv",) + groups, dtype)
    if config.conv_bias:
      self.conv_x_bias = layers.param(rngs, (m, p), heads, dtype, "zeros")
      self.conv_B_bias = layers.param(rngs, (g, n), groups, dtype, "zeros")
      self.conv_C_bias = layers.param(rngs, (g, n), groups, dtype, "zeros")
    # transformers' initial values: A = -(1..M), D = 1, dt_bias = 1.
    self.A_log = nnx.Param(jnp.log(jnp.arange(1, m + 1, dtype=jnp.float32)).astype(dtype),
                           axes=("mamba_heads",))
    self.D = layers.param(rngs, (m,), ("mamba_heads",), dtype, "ones")
    self.dt_bias = layers.param(rngs, (m,), ("mamba_heads",), dtype, "ones")
    self.norm = layers.param(rngs, (m, p), heads, dtype, "ones")
    self.out_proj = layers.param(rngs, (m, p, d), heads + ("embed",), dtype)

  def __call__(self, x: jax.Array, segment_ids: jax.Array, cache: MambaCache | None = None
               ) -> tuple[jax.Array, dict[str, jax.Array], MambaCache | None]:
    """x [B,T,D] (normed), segment_ids [B,T] -> (output [B,T,D] in x's dtype, intermediates,
    the new cache where `cache` was given).

    Intermediates: mamba_x [B,T,M,P] (the x branch of in_proj, before the convolution: what
    ModelOpt scores heads and head channels by) and mamba_out [B,T,M,P] (the normed, gated scan
    output that feeds out_proj)."""
    cfg, dt_ = self.config, x.dtype
    act = layers.ACTIVATIONS[cfg.activation]

    def project(kernel, spec):
      return jnp.einsum(spec, x, kernel[...].astype(dt_))

    z = project(self.in_z, "BTD,DMP->BTMP")
    xs = project(self.in_x, "BTD,DMP->BTMP")
    Bs = project(self.in_B, "BTD,DGN->BTGN")
    Cs = project(self.in_C, "BTD,DGN->BTGN")
    dt = project(self.in_dt, "BTD,DM->BTM")
    doc = ssd.document_index(segment_ids)
    cache_in = MambaCache.zeros(cfg, x.shape[0]) if cache is None else cache

    def conv(inputs, name, history):
      bias = getattr(self, f"{name}_bias")[...] if cfg.conv_bias else None
      out, new_history = causal_conv(inputs, getattr(self, name)[...], bias, doc, history)
      return act(out.astype(jnp.float32)).astype(dt_), new_history

    xc, hist_x = conv(xs, "conv_x", cache_in.conv_x)
    Bc, hist_B = conv(Bs, "conv_B", cache_in.conv_B)
    Cc, hist_C = conv(Cs, "conv_C", cache_in.conv_C)
    low, high = cfg.time_step_limit
    step = jnp.clip(jax.nn.softplus(dt.astype(jnp.float32)
                                    + self.dt_bias[...].astype(jnp.float32)), low, high)
    A = -jnp.exp(self.A_log[...].astype(jnp.float32))
    initial = None if cache is None else cache.ssm
    if x.shape[1] == 1:  # a decode step: the recurrence, not a chunk padded from one position
      y, state = ssd.ssd_sequential(xc, step, A, Bc, Cc, self.D[...], segment_ids,
                                    initial_state=initial)
    else:
      y, state = ssd.ssd_chunked(xc, step, A, Bc, Cc, self.D[...], segment_ids,
                                 chunk_size=cfg.chunk_size, initial_state=initial)
    normed = gated_group_norm(y, z, self.norm[...], cfg.num_groups, self.norm_eps).astype(dt_)
    out = jnp.einsum("BTMP,MPD->BTD", normed, self.out_proj[...].astype(dt_))
    new_cache = None if cache is None else MambaCache(hist_x, hist_B, hist_C, state)
    return out, dict(mamba_x=xs, mamba_out=normed), new_cache
