"""Rotary position embeddings: inverse frequencies (plain, linear or Llama 3.1 scaled; Gemma 3's
local layers at their own theta), the cos / sin tables of positions and the rotate-half rotation
of the first rotary_dim channels of each head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from minitron_jax.models.config import ModelConfig


def rope_inverse_frequencies(config: ModelConfig, local: bool = False) -> np.ndarray:
  """Per-pair inverse frequencies [rotary_dim/2], computed in float32 as the reference does.

  `local`: those of the sliding-window layers, at local_rope_theta and unscaled (Gemma 3)."""
  dim = config.rotary_dim
  theta = config.local_rope_theta if local else config.rope_theta
  exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
  inv_freq = (np.float32(1.0) / (np.float32(theta) ** exponents)).astype(np.float32)
  scaling = None if local else config.rope_scaling
  if scaling is None:
    return inv_freq
  if scaling.kind == "linear":
    return (inv_freq / np.float32(scaling.factor)).astype(np.float32)
  # llama3: keep high frequencies, divide low ones by `factor`, interpolate in between.
  old_len = scaling.original_max_position_embeddings
  low_wavelen = old_len / scaling.low_freq_factor
  high_wavelen = old_len / scaling.high_freq_factor
  wavelen = 2 * np.pi / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
  smooth = (old_len / wavelen - scaling.low_freq_factor) / (
      scaling.high_freq_factor - scaling.low_freq_factor)
  smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def rotary_tables(config: ModelConfig, positions: jax.Array,
                  local: bool = False) -> tuple[jax.Array, jax.Array]:
  """cos, sin of shape [B,T,rotary_dim] in float32 (the two halves repeat, as in rotate-half RoPE);
  [B,T,0] without rotary embeddings (`config.rotary` False), which apply_rotary passes through."""
  if not config.rotary:
    empty = jnp.zeros(positions.shape + (0,), jnp.float32)
    return empty, empty
  inv_freq = rope_inverse_frequencies(config, local)
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x [B,T,heads,H]; rotates the first rotary_dim channels and passes the rest through."""
  rot = cos.shape[-1]
  x_rot, x_pass = x[..., :rot], x[..., rot:]
  first, second = jnp.split(x_rot, 2, axis=-1)
  rotated = jnp.concatenate([-second, first], axis=-1)
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  x_rot = (x_rot.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)
  return jnp.concatenate([x_rot, x_pass], axis=-1)
