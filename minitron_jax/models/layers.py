"""The pieces every block of the decoder is built from: a parameter with its logical axes, the
norms, the activations and the dense MLP (a mixture's shared expert is one too).

Axis letters in einsum strings: B batch, T positions, D hidden, F MLP intermediate.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from minitron_jax.models.config import ModelConfig

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu2": lambda x: jnp.square(jax.nn.relu(x)),
}


def param(rngs: nnx.Rngs, shape, axes, dtype, init: str = "normal") -> nnx.Param:
  if init == "normal":
    value = 0.02 * jax.random.normal(rngs.params(), shape, dtype)
  elif init == "ones":
    value = jnp.ones(shape, dtype)
  else:
    value = jnp.zeros(shape, dtype)
  return nnx.Param(value, axes=axes)


class Norm(nnx.Module):
  """RMSNorm; Gemma's RMSNorm (rms1p) or Nemotron's LayerNorm1P, whose stored scale is offset by
  one. Computed in float32 and multiplied by the scale before casting back, as transformers does."""

  def __init__(self, size: int, kind: str, eps: float, dtype, rngs: nnx.Rngs, axis: str):
    self.kind, self.eps = kind, eps
    self.scale = param(rngs, (size,), (axis,), dtype, "ones" if kind == "rms" else "zeros")
    self.bias = param(rngs, (size,), (axis,), dtype, "zeros") if kind == "layernorm1p" else None

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    if self.kind in ("rms", "rms1p"):
      y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.eps)
      scale = self.scale[...].astype(jnp.float32)
      y = y * (1.0 + scale if self.kind == "rms1p" else scale)
    else:
      centred = x32 - jnp.mean(x32, -1, keepdims=True)
      y = centred * jax.lax.rsqrt(jnp.mean(jnp.square(centred), -1, keepdims=True) + self.eps)
      y = y * (self.scale[...].astype(jnp.float32) + 1.0) + self.bias[...].astype(jnp.float32)
    return y.astype(x.dtype)


class MLP(nnx.Module):
  """Gated (SwiGLU-style) or plain (Nemotron relu²) feed-forward block; `width` and `axis` name
  another one of its kind (a mixture's shared expert)."""

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs, width: int | None = None,
               axis: str = "mlp"):
    d, f = config.hidden_size, width or config.intermediate_size
    dtype = jnp.dtype(config.param_dtype)
    self.config = config
    if config.gated_mlp:
      self.gate_proj = param(rngs, (d, f), ("embed", axis), dtype)
    self.up_proj = param(rngs, (d, f), ("embed", axis), dtype)
    self.down_proj = param(rngs, (f, d), (axis, "embed"), dtype)
    if config.mlp_bias:
      if config.gated_mlp:
        self.gate_bias = param(rngs, (f,), (axis,), dtype, "zeros")
      self.up_bias = param(rngs, (f,), (axis,), dtype, "zeros")
      self.down_bias = param(rngs, (d,), ("embed",), dtype, "zeros")

  def __call__(self, x) -> tuple[jax.Array, jax.Array]:
    """x [B,T,D] -> (output [B,T,D], activation [B,T,F] that feeds down_proj)."""
    cfg, dt = self.config, x.dtype

    def project(name: str) -> jax.Array:
      y = jnp.einsum("BTD,DF->BTF", x, getattr(self, f"{name}_proj")[...].astype(dt))
      return y + getattr(self, f"{name}_bias")[...].astype(dt) if cfg.mlp_bias else y

    act = ACTIVATIONS[cfg.activation](project("up") if not cfg.gated_mlp else project("gate"))
    if cfg.gated_mlp:
      act = act * project("up")
    out = jnp.einsum("BTF,FD->BTD", act, self.down_proj[...].astype(dt))
    if cfg.mlp_bias:
      out = out + self.down_bias[...].astype(dt)
    return out, act
