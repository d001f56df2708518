"""Google's tokamax GPU kernels at our two hot spots: packed attention and grouped expert matmuls.

tokamax (pip `tokamax`, in the `cuda` extras) is imported inside the functions, so the library
runs without it; asking for it explicitly without the package is a one-line ConfigError. On its
first call it parses absl flags if the host program has not, which validates every registered
flag: a host's required absl flags fail there (main.py checks its own for that reason).

Attention (attention.attend with implementation="tokamax"). Our mask -- query t sees key s when
s <= t, both in the same nonzero segment, t - s < window -- becomes tokamax's causal mask plus a
per-query first visible key, k_start[t] = max(first position of t's segment run, t - window + 1).
That is exact when every nonzero segment id occupies one contiguous run (the packer numbers
documents 1, 2, ... in order); a lax.cond sends any other batch (a segment id reappearing after
another) to `fallback` (blockwise). A traced window (a per-layer value from a scan) is fine: it
only moves k_start. Padding queries see the padding run before them, so no row is empty; they
are zeroed afterwards, as blockwise leaves them. Kernels, chosen by `attention_kernel`:
  mosaic_gpu  Pallas Mosaic GPU flash attention, forward and backward, on sm90 (H100) and sm100
              (B200) with bfloat16/float16 inputs (its backward takes nothing else); it reads
              k_start per block and applies soft-capping in both directions.
  triton      Pallas Triton flash attention, other NVIDIA GPUs from sm80 (A100). Its backward
              builds a [B,1,T,S] boolean mask from k_start and has no soft-capping: with a
              soft-cap the fallback runs instead.
  xla         tokamax's reference: the whole score tensor, like naive; tests only.
On CPU nothing here runs by itself (attention="tokamax" needs a CUDA GPU). The tests run the
Triton kernel's forward in Pallas interpret mode (its backward kernel does not interpret: a
program_id inside a pl.when has no CPU lowering) and tokamax's XLA implementation through this
same wrapper for values and gradients, soft-cap included; Mosaic GPU kernels check the GPU
architecture while tracing and cannot run on a CPU at all.

Grouped expert matmuls (moe.experts with implementation="tokamax"): tokamax.ragged_dot, the same
contract as jax.lax.ragged_dot, on its Mosaic GPU kernel on sm90 / sm100 (backward: two more
ragged dots, one with a ragged contracting dimension, which sm80 lacks) and its XLA path
elsewhere, which is jax.lax.ragged_dot with tokamax's own VJP.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Callable

import jax
import jax.numpy as jnp

from minitron_jax.errors import ConfigError


def available() -> bool:
  """Whether the tokamax package is installed ("auto" only picks it then)."""
  try:
    return importlib.util.find_spec("tokamax") is not None
  except ValueError:  # sys.modules["tokamax"] is None: imports of it are blocked
    return False


def _import(setting: str) -> Any:
  try:
    import tokamax  # heavy (xprof, qwix): only when asked for
  except ImportError:
    raise ConfigError(f"{setting} needs the tokamax package: pip install "
                      "'minitron-jax[cuda]'") from None
  return tokamax


def unsharded() -> bool:
  """No multi-device mesh in context. Our calls pass tokamax no sharding, and XLA cannot split
  a Pallas kernel: on a mesh GSPMD would gather its inputs, so "auto" picks tokamax only here."""
  mesh = jax.sharding.get_abstract_mesh()
  return mesh.empty or mesh.size == 1 or bool(mesh.manual_axes)


def _compute_capability() -> float:
  """The default device's CUDA compute capability (9.0 on an H100); 0 off NVIDIA GPUs."""
  return float(getattr(jax.devices()[0], "compute_capability", 0) or 0)


# ----------------------------------------------------------------------------- attention


def attention_kernel(dtype: jnp.dtype, softcap: float | None) -> str | None:
  """Which tokamax kernel computes attention here, forward and backward; None: none does."""
  capability = _compute_capability()
  if capability >= 9.0 and capability < 11.0 and dtype in (jnp.bfloat16, jnp.float16):
    return "mosaic_gpu"
  if capability >= 8.0 and softcap is None:
    return "triton"
  return None


def packed_mask(segment_ids: jax.Array, window: int | jax.Array) -> tuple[Any, jax.Array]:
  """(tokamax Mask: causal plus k_start [B,1,T], exact: bool scalar).

  `exact` is False when some nonzero segment id starts a run after a larger or equal id has
  been seen (it reappears, or ids go down): k_start then hides keys naive would show."""
  from tokamax._src.ops.attention import base  # the Mask with k_start is not exported

  t = segment_ids.shape[1]
  positions = jnp.arange(t, dtype=jnp.int32)
  new_run = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                             segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)  # [B,T]
  run_start = jax.lax.cummax(jnp.where(new_run, positions, 0), axis=1)
  # window <= int32 max, so positions - window + 1 >= -(2**31 - 2): no overflow.
  k_start = jnp.maximum(run_start, positions - jnp.asarray(window, jnp.int32) + 1)
  seen = jnp.concatenate([jnp.zeros_like(segment_ids[:, :1]),
                          jax.lax.cummax(segment_ids, axis=1)[:, :-1]], axis=1)
  exact = jnp.all(~new_run | (segment_ids == 0) | (segment_ids > seen))
  return base.Mask(is_causal=True, k_start=k_start[:, None, :]), exact


def attend(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
           window: int | jax.Array, scale: float, softcap: float | None,
           fallback: Callable[..., jax.Array], kernel: str | Callable | None = None) -> jax.Array:
  """q [B,T,K,G,H], k and v [B,T,K,H], segment_ids [B,T] -> [B,T,K,G,H] in q's dtype.

  `kernel`: a name from attention_kernel, a tokamax attention op (tests pass one that skips the
  device check), or None for attention_kernel's choice; without one, `fallback(q, k, v,
  segment_ids, window)` computes everything.
  """
  _import("attention='tokamax'")
  from tokamax._src.ops.attention import api

  if kernel is None:
    kernel = attention_kernel(q.dtype, softcap)
  if kernel is None or (kernel == "triton" and softcap is not None):
    return fallback(q, k, v, segment_ids, window)
  op = api.IMPLEMENTATIONS[kernel] if isinstance(kernel, str) else kernel
  b, t, kh, g, h = q.shape
  mask, exact = packed_mask(segment_ids, window)

  def fused():
    # Query head n = k * G + g reads key/value head n // G: tokamax's grouped-query layout.
    out = op(q.reshape(b, t, kh * g, h), k, v, mask=mask, logits_scale=scale,
             logits_soft_cap=softcap)
    return out.reshape(q.shape).astype(q.dtype)

  try:
    out = jax.lax.cond(exact, fused, lambda: fallback(q, k, v, segment_ids, window))
  except NotImplementedError:
    # tokamax refuses some shapes (head_dim, sequence tiling) while tracing: then the fallback.
    return fallback(q, k, v, segment_ids, window)
  return jnp.where((segment_ids != 0)[:, :, None, None, None], out, 0).astype(q.dtype)


# ----------------------------------------------------------------------------- experts


def grouped_kernel() -> str:
  """tokamax's ragged_dot implementation here: its Mosaic GPU kernel where forward and backward
  both run (sm90, sm100), else its XLA path."""
  capability = _compute_capability()
  return "mosaic" if 9.0 <= capability < 11.0 else "xla"


def ragged_dot(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array,
               kernel: str | None = None) -> jax.Array:
  """lhs [M,D] sorted by group, rhs [E,D,F], group_sizes [E] (summing to M) -> [M,F]: row m
  times the matrix of its group, as jax.lax.ragged_dot."""
  tokamax = _import("moe_dispatch='tokamax'")
  return tokamax.ragged_dot(lhs, rhs, group_sizes,
                            implementation=kernel or grouped_kernel())
