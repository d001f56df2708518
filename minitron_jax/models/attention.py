"""The attention block (`Attention`: projections, qk-norm, RoPE, the output projection) and the
causal, packed, windowed grouped-query attention it calls, behind one function (`attend`), with
several kernels.

Every implementation computes the same masked softmax: query t sees key s when s <= t, both carry
the same nonzero segment id (0 marks padding), and t - s < window. With `softcap` (Gemma 2) the
scaled scores become softcap * tanh(score / softcap) before the mask and softmax. Axis letters as in model.py:
  B batch, T query positions, S key positions (S == T: self-attention), K key/value heads
  (query groups), G queries per group, H head_dim.

  naive      the whole [B,K,G,T,S] float32 score tensor and a [B,T,S] mask; the reference.
  blockwise  flash attention in plain JAX with a custom VJP: memory grows as T x block, never
             T x T, and key blocks outside the causal/window band are skipped.
  cudnn      jax.nn.dot_product_attention's cuDNN kernel on CUDA GPUs, for what it can express
             (no soft-capping: blockwise computes those).
  splash     the Pallas TPU splash-attention kernel (Pallas interpret mode off TPU: tests only).
  tokamax    Google tokamax's flash kernels on CUDA GPUs (Mosaic GPU on H100/B200 in bfloat16,
             else Triton), packed rows and soft-capping included (tokamax_kernels.py says what
             falls back to blockwise). Needs the `cuda` extra.
  auto       splash on TPU; on GPU cudnn for rows holding one sequence and AUTO_GPU_PACKED
             for packed rows and soft-capping (blockwise until a GPU run of gpu_suite.py
             measures tokamax; with the switch on, tokamax where installed, it applies, and no
             multi-device mesh is in context); else blockwise.

Query rows that see no key (padding) come out as zeros from blockwise, cudnn and splash, and as a
uniform average of every value from naive; they carry no loss, so only naive's rounding matters.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minitron_jax.models import layers, rope, tokamax_kernels
from minitron_jax.models.config import ATTENTION_IMPLEMENTATIONS, ModelConfig
from minitron_jax.errors import ConfigError

NO_WINDOW = int(np.iinfo(np.int32).max)
# Finite, so a row with nothing visible gives a uniform softmax in naive and no NaN anywhere.
_MASKED = -1e30
# The splash kernel tiles sequences in multiples of the TPU lane width.
_SPLASH_TILE = 128
# What "auto" runs on a GPU for what cuDNN cannot express (packed rows, soft-capping): "tokamax"
# or "blockwise". Blockwise until tokamax has run on a GPU: gpu_suite.py times both (part d), and
# its figures decide this switch.
AUTO_GPU_PACKED = "blockwise"


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, segment_ids: jax.Array,
           window: int | jax.Array = NO_WINDOW, scale: float, implementation: str = "auto",
           block_size: int = 512, softcap: float | None = None,
           key_segment_ids: jax.Array | None = None, query_start: int | jax.Array = 0
           ) -> jax.Array:
  """q [B,T,K,G,H], k and v [B,S,K,H], segment_ids [B,T] -> [B,T,K,G,H] in q's dtype.

  `window` is a Python int or a traced int32 scalar (a per-layer value from a scan); keys with
  query_pos - key_pos >= window are masked, NO_WINDOW masks none. cudnn and splash need a Python
  int and fall back to blockwise for a traced one, as for masks they cannot express.

  `key_segment_ids` [B,S]: the keys are a KV cache's S slots with their own segment ids and the
  queries sit at slots query_start.. (a traced int32 is fine); naive computes it, whatever
  `implementation` says (one decoded token per row makes a [B,K,G,1,S] score tensor).
  """
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ConfigError(f"attention={implementation!r} is not supported; allowed: "
                      f"{ATTENTION_IMPLEMENTATIONS}")
  if key_segment_ids is not None:
    return _naive(q, k, v, segment_ids, window, scale, softcap, key_segment_ids, query_start)
  if k.shape[1] != q.shape[1]:
    raise ValueError(f"self-attention only: {q.shape[1]} queries but {k.shape[1]} keys")
  platform = jax.default_backend()
  static_window = isinstance(window, (int, np.integer))
  blockwise = functools.partial(_blockwise, scale=scale, block_size=block_size, softcap=softcap)
  if implementation == "auto":
    if platform == "gpu":
      return _auto_gpu(q, k, v, segment_ids, window, scale, softcap, blockwise)
    implementation = "splash" if platform == "tpu" and static_window else "blockwise"
  if implementation == "naive":
    return _naive(q, k, v, segment_ids, window, scale, softcap)
  if implementation == "cudnn":
    if platform != "gpu":
      raise ConfigError(f"attention='cudnn' needs a CUDA GPU; this backend is {platform}")
    if softcap is not None:  # cuDNN's public face has no soft-capping
      return blockwise(q, k, v, segment_ids, window)
    return _cudnn(q, k, v, segment_ids, window, scale, blockwise)
  if implementation == "tokamax":
    if platform != "gpu":
      raise ConfigError(f"attention='tokamax' needs a CUDA GPU; this backend is {platform}")
    return tokamax_kernels.attend(q, k, v, segment_ids, window, scale, softcap, blockwise)
  if implementation == "splash" and static_window:
    return _splash(q, k, v, segment_ids, int(window), scale, block_size, softcap,
                   interpret=platform != "tpu")
  return blockwise(q, k, v, segment_ids, window)


def _auto_gpu(q, k, v, segment_ids, window, scale, softcap, blockwise):
  """cuDNN for rows holding one sequence; packed rows and soft-capping go to AUTO_GPU_PACKED."""
  packed = blockwise
  if (AUTO_GPU_PACKED == "tokamax" and tokamax_kernels.available() and tokamax_kernels.unsharded()
      and tokamax_kernels.attention_kernel(q.dtype, softcap) is not None):
    packed = functools.partial(tokamax_kernels.attend, scale=scale, softcap=softcap,
                               fallback=blockwise)
  if softcap is not None:  # cuDNN's public face has no soft-capping
    return packed(q, k, v, segment_ids, window)
  try:
    return _cudnn(q, k, v, segment_ids, window, scale, packed)
  except (NotImplementedError, ValueError, RuntimeError):
    # cuDNN refuses some shapes and library versions while tracing.
    return packed(q, k, v, segment_ids, window)


# ----------------------------------------------------------------------------- masks


def _visible(q_segments, k_segments, q_start, k_start, window) -> jax.Array:
  """[B,T,S] bool for queries from q_start and keys from k_start (absolute positions)."""
  q_pos = q_start + jnp.arange(q_segments.shape[1], dtype=jnp.int32)
  k_pos = k_start + jnp.arange(k_segments.shape[1], dtype=jnp.int32)
  distance = q_pos[:, None] - k_pos[None, :]  # [T,S]
  return (((distance >= 0) & (distance < window))[None]
          & (q_segments[:, :, None] == k_segments[:, None, :])
          & (k_segments[:, None, :] != 0))


def _scores(q, k, scale) -> jax.Array:
  """q [B,T,K,G,H], k [B,S,K,H] -> scaled float32 scores [B,K,G,T,S]."""
  return jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32) * scale


def _capped(scores, softcap) -> tuple[jax.Array, jax.Array | None]:
  """(softcap * tanh(scores / softcap), its derivative 1 - tanh²) or (scores, None) uncapped."""
  if softcap is None:
    return scores, None
  t = jnp.tanh(scores / softcap)
  return softcap * t, 1.0 - jnp.square(t)


# ----------------------------------------------------------------------------- naive


def _naive(q, k, v, segment_ids, window, scale, softcap=None, key_segment_ids=None,
           query_start=0):
  key_segment_ids = segment_ids if key_segment_ids is None else key_segment_ids
  mask = _visible(segment_ids, key_segment_ids, query_start, 0, window)
  scores = jnp.where(mask[:, None, None], _capped(_scores(q, k, scale), softcap)[0], _MASKED)
  probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
  return jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)


# ----------------------------------------------------------------------------- blockwise


def _blockwise(q, k, v, segment_ids, window, *, scale, block_size, softcap=None):
  t = q.shape[1]
  block = min(block_size, t)
  pad = -t % block
  if pad:
    # Padding keys carry segment 0, so nothing sees them; padding queries see nothing.
    widen = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    q, k, v, segment_ids = widen(q), widen(k), widen(v), widen(segment_ids)
  out = _flash(q, k, v, segment_ids, jnp.asarray(window, jnp.int32), scale, block, softcap)
  return out[:, :t]


def _band(i, block, window):
  """The first and last key block that query block i can see (causal, within the window)."""
  first_key = i * block - window + 1  # int32: window <= NO_WINDOW cannot overflow
  return jnp.maximum(jnp.floor_divide(first_key, block), 0), i


def _over_blocks(num_blocks, lo, hi, body, carry):
  """body(j, carry) for j in [lo, hi]; a single block runs without a loop (the CPU default)."""
  if num_blocks == 1:
    return body(0, carry)
  return jax.lax.fori_loop(lo, hi + 1, body, carry)


def _per_query_block(num_blocks, fn, carry):
  """fn(carry, i) -> (carry, y) over query blocks; ys stacked on a leading blocks axis."""
  if num_blocks == 1:
    carry, y = fn(carry, jnp.int32(0))
    return carry, jax.tree.map(lambda a: a[None], y)
  return jax.lax.scan(fn, carry, jnp.arange(num_blocks, dtype=jnp.int32))


def _unblock(x, axis):
  """[n, ..., block (at axis+1), ...] -> [..., n * block, ...]: query blocks back in order."""
  x = jnp.moveaxis(x, 0, axis)
  return x.reshape(*x.shape[:axis], -1, *x.shape[axis + 2:])


def _slice(x, start, block):
  return jax.lax.dynamic_slice_in_dim(x, start, block, axis=1)


def _flash_forward(q, k, v, segment_ids, window, scale, block, softcap):
  """(out [B,T,K,G,H] in q's dtype, logsumexp [B,K,G,T] float32; 0 where a row sees nothing)."""
  b, t, kh, g, h = q.shape
  num_blocks = t // block

  def query_block(_, i):
    q_start = i * block
    qb, q_seg = _slice(q, q_start, block), _slice(segment_ids, q_start, block)

    def key_block(j, carry):
      row_max, denom, acc = carry  # [B,K,G,Tq] x2, [B,K,G,Tq,H]
      k_start = j * block
      mask = _visible(q_seg, _slice(segment_ids, k_start, block), q_start, k_start, window)
      mask = mask[:, None, None]
      scores = _capped(_scores(qb, _slice(k, k_start, block), scale), softcap)[0]
      scores = jnp.where(mask, scores, _MASKED)
      new_max = jnp.maximum(row_max, jnp.max(scores, -1))
      # The where, not the max, zeroes masked keys: a row with nothing visible yet has max _MASKED.
      probs = jnp.where(mask, jnp.exp(scores - new_max[..., None]), 0.0)
      rescale = jnp.exp(row_max - new_max)
      acc = rescale[..., None] * acc + jnp.einsum(
          "BKGTS,BSKH->BKGTH", probs.astype(v.dtype), _slice(v, k_start, block),
          preferred_element_type=jnp.float32)
      return new_max, rescale * denom + jnp.sum(probs, -1), acc

    init = (jnp.full((b, kh, g, block), _MASKED, jnp.float32),
            jnp.zeros((b, kh, g, block), jnp.float32),
            jnp.zeros((b, kh, g, block, h), jnp.float32))
    lo, hi = _band(i, block, window)
    row_max, denom, acc = _over_blocks(num_blocks, lo, hi, key_block, init)
    seen = denom > 0
    out = jnp.where(seen[..., None], acc / jnp.where(seen, denom, 1.0)[..., None], 0.0)
    lse = jnp.where(seen, row_max + jnp.log(jnp.where(seen, denom, 1.0)), 0.0)
    return None, (jnp.einsum("BKGTH->BTKGH", out).astype(q.dtype), lse)

  _, (out, lse) = _per_query_block(num_blocks, query_block, None)
  return _unblock(out, 1), _unblock(lse, 3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _flash(q, k, v, segment_ids, window, scale, block, softcap):
  return _flash_forward(q, k, v, segment_ids, window, scale, block, softcap)[0]


def _flash_fwd(q, k, v, segment_ids, window, scale, block, softcap):
  out, lse = _flash_forward(q, k, v, segment_ids, window, scale, block, softcap)
  return out, (q, k, v, segment_ids, window, out, lse)


def _flash_bwd(scale, block, softcap, residuals, d_out):
  """FlashAttention-2's backward: scores recomputed block by block from the saved logsumexp."""
  q, k, v, segment_ids, window, out, lse = residuals
  b, t, kh, g, h = q.shape
  num_blocks = t // block
  # D = rowsum(dO * O) [B,K,G,T]: the softmax Jacobian's correction term.
  delta = jnp.einsum("BTKGH,BTKGH->BKGT", d_out.astype(jnp.float32), out.astype(jnp.float32))

  def query_block(carry, i):
    q_start = i * block
    qb, q_seg = _slice(q, q_start, block), _slice(segment_ids, q_start, block)
    d_ob = _slice(d_out, q_start, block)
    lse_b = jax.lax.dynamic_slice_in_dim(lse, q_start, block, axis=3)
    delta_b = jax.lax.dynamic_slice_in_dim(delta, q_start, block, axis=3)

    def key_block(j, inner):
      dq, dk, dv = inner  # [B,Tq,K,G,H], [B,T,K,H] x2, all float32
      k_start = j * block
      kb, vb = _slice(k, k_start, block), _slice(v, k_start, block)
      mask = _visible(q_seg, _slice(segment_ids, k_start, block), q_start, k_start, window)
      scores, slope = _capped(_scores(qb, kb, scale), softcap)
      probs = jnp.where(mask[:, None, None], jnp.exp(scores - lse_b[..., None]), 0.0)
      dv_b = jnp.einsum("BKGTS,BTKGH->BSKH", probs.astype(d_out.dtype), d_ob,
                        preferred_element_type=jnp.float32)
      d_probs = jnp.einsum("BTKGH,BSKH->BKGTS", d_ob, vb, preferred_element_type=jnp.float32)
      d_scores = probs * (d_probs - delta_b[..., None])
      if slope is not None:  # the chain rule through softcap * tanh(score / softcap)
        d_scores = d_scores * slope
      d_scores = (d_scores * scale).astype(q.dtype)
      dq = dq + jnp.einsum("BKGTS,BSKH->BTKGH", d_scores, kb, preferred_element_type=jnp.float32)
      dk_b = jnp.einsum("BKGTS,BTKGH->BSKH", d_scores, qb, preferred_element_type=jnp.float32)
      add = lambda acc, x: jax.lax.dynamic_update_slice_in_dim(
          acc, _slice(acc, k_start, block) + x, k_start, axis=1)
      return dq, add(dk, dk_b), add(dv, dv_b)

    lo, hi = _band(i, block, window)
    dq, dk, dv = _over_blocks(num_blocks, lo, hi, key_block,
                              (jnp.zeros(qb.shape, jnp.float32), *carry))
    return (dk, dv), dq.astype(q.dtype)

  zeros = jnp.zeros(k.shape, jnp.float32)
  (dk, dv), dq = _per_query_block(num_blocks, query_block, (zeros, zeros))
  # Integer inputs (segment ids, window) take no cotangent.
  return _unblock(dq, 1), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------- cudnn


def _cudnn(q, k, v, segment_ids, window, scale, blockwise, kernel="cudnn"):
  """cuDNN's fused kernel where it can express the mask, else `blockwise`.

  Its public face takes one causal sequence per row plus trailing padding (lengths) and a static
  left window, not packed segments; whether a batch is packed is only known at run time, so a
  lax.cond picks the kernel per batch. `kernel="xla"` runs the same mapping on CPU, for tests.
  """
  b, t, kh, g, h = q.shape
  fallback = lambda: blockwise(q, k, v, segment_ids, window)
  static = isinstance(window, (int, np.integer))
  half_precision = q.dtype in (jnp.bfloat16, jnp.float16) or kernel != "cudnn"
  if not (static and half_precision and h % 8 == 0 and h <= 128):
    return fallback()
  valid = segment_ids != 0
  lengths = jnp.sum(valid, axis=1, dtype=jnp.int32)
  one_sequence = jnp.all((valid == (jnp.arange(t) < lengths[:, None]))
                         & (~valid | (segment_ids == segment_ids[:, :1])))

  def fused():
    # A fully padded row keeps one key so the kernel's softmax stays finite; it is zeroed below.
    seen = jnp.maximum(lengths, 1)
    out = jax.nn.dot_product_attention(
        q.reshape(b, t, kh * g, h), k, v, scale=scale, is_causal=True, query_seq_lengths=seen,
        key_value_seq_lengths=seen, implementation=kernel,
        local_window_size=None if window >= t else (int(window) - 1, 0))
    return out.reshape(q.shape)

  out = jax.lax.cond(one_sequence, fused, fallback)
  return jnp.where(valid[:, :, None, None, None], out, 0).astype(q.dtype)


# ----------------------------------------------------------------------------- splash


def _splash(q, k, v, segment_ids, window, scale, block_size, softcap, *, interpret):
  """The Pallas splash kernel, one multi-query call per (batch row, key/value head).

  Its segment mask lets padding see padding, so no row is empty (the kernel needs that);
  padding rows are zeroed afterwards, as blockwise leaves them.
  """
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # TPU-only import cost

  b, t, kh, g, h = q.shape
  block = min(-(-block_size // _SPLASH_TILE), -(-t // _SPLASH_TILE)) * _SPLASH_TILE
  pad = -t % block
  widen = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
  qp, kp, vp, seg = widen(q), widen(k), widen(v), widen(segment_ids)
  length = t + pad
  shape = (length, length)
  head_mask = (splash.CausalMask(shape) if window >= length
               else splash.LocalMask(shape, window_size=(window - 1, 0), offset=0))
  sizes = dict.fromkeys(("block_q", "block_kv", "block_kv_compute", "block_q_dkv",
                         "block_kv_dkv", "block_kv_dkv_compute", "block_q_dq", "block_kv_dq"),
                        block)
  kernel = splash.make_splash_mqa_single_device(
      splash.MultiHeadMask([head_mask] * g), block_sizes=splash.BlockSizes(**sizes),
      attn_logits_soft_cap=softcap, interpret=interpret)
  # The kernel takes unscaled logits: scale the queries instead.
  qp = (qp.astype(jnp.float32) * scale).astype(q.dtype)

  def one_row(q_row, k_row, v_row, seg_row):  # [T,K,G,H], [T,K,H] x2, [T]
    ids = splash.SegmentIds(q=seg_row, kv=seg_row)
    # One multi-query call per key/value head: q [G,T,H], k and v [T,H].
    per_group = jax.vmap(lambda qg, kg, vg: kernel(qg, kg, vg, segment_ids=ids),
                         in_axes=(0, 1, 1))
    return per_group(jnp.einsum("TKGH->KGTH", q_row), k_row, v_row)  # [K,G,T,H]

  out = jax.vmap(one_row)(qp, kp, vp, seg)  # [B,K,G,T,H]
  out = jnp.einsum("BKGTH->BTKGH", out)[:, :t]
  return jnp.where((segment_ids != 0)[:, :, None, None, None], out, 0).astype(q.dtype)


# ----------------------------------------------------------------------------- the block


class Attention(nnx.Module):
  """Grouped-query attention; query head n reads key/value head n // queries_per_group."""

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
    d, n, k, h = (config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                  config.head_dim)
    dtype = jnp.dtype(config.param_dtype)
    self.config = config
    self.q_proj = layers.param(rngs, (d, n, h), ("embed", "q_heads", "head_dim"), dtype)
    self.k_proj = layers.param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), dtype)
    self.v_proj = layers.param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), dtype)
    self.o_proj = layers.param(rngs, (n, h, d), ("q_heads", "head_dim", "embed"), dtype)
    if config.qkv_bias:
      self.q_bias = layers.param(rngs, (n, h), ("q_heads", "head_dim"), dtype, "zeros")
      self.k_bias = layers.param(rngs, (k, h), ("kv_heads", "head_dim"), dtype, "zeros")
      self.v_bias = layers.param(rngs, (k, h), ("kv_heads", "head_dim"), dtype, "zeros")
    if config.o_bias:
      self.o_bias = layers.param(rngs, (d,), ("embed",), dtype, "zeros")
    if config.qk_norm:
      kind = "rms1p" if config.norm == "rms1p" else "rms"  # Gemma 3 offsets these by one too
      self.q_norm = layers.Norm(h, kind, config.norm_eps, dtype, rngs, axis="head_dim")
      self.k_norm = layers.Norm(h, kind, config.norm_eps, dtype, rngs, axis="head_dim")

  def __call__(self, x, cos, sin, segment_ids, window, cache=None):
    """x [B,T,D], segment_ids [B,T], window (int or traced int32) -> (output [B,T,D],
    per-head output [B,T,N,H], updated cache).

    `cache`: this layer's kv_cache.KVCache (None: none, and None comes back). x's keys and
    values are written into it, and its queries attend to whatever it says they see."""
    cfg = self.config
    dt = x.dtype

    def project(name: str) -> jax.Array:
      y = jnp.einsum("BTD,DKH->BTKH", x, getattr(self, f"{name}_proj")[...].astype(dt))
      if cfg.qkv_bias:
        y = y + getattr(self, f"{name}_bias")[...].astype(dt)
      return y

    q, k, v = project("q"), project("k"), project("v")
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = rope.apply_rotary(q, cos, sin), rope.apply_rotary(k, cos, sin)
    key_segment_ids, query_start = None, 0
    if cache is not None:
      cache, (k, v, key_segment_ids, query_start) = cache.update(k, v, segment_ids)
    b, t, _, h = q.shape
    q = q.reshape(b, t, cfg.num_key_value_heads, cfg.queries_per_group, h)
    scale = (cfg.query_pre_attn_scalar or h) ** -0.5
    heads = attend(q, k, v, segment_ids=segment_ids, window=window, scale=scale,
                             implementation=cfg.attention, block_size=cfg.attention_block_size,
                             softcap=cfg.attn_logit_softcap, key_segment_ids=key_segment_ids,
                             query_start=query_start)
    heads = heads.reshape(b, t, cfg.num_attention_heads, h)
    out = jnp.einsum("BTNH,NHD->BTD", heads, self.o_proj[...].astype(dt))
    if cfg.o_bias:
      out = out + self.o_bias[...].astype(dt)
    return out, heads, cache
