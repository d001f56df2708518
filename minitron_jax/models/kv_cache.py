"""A fixed-size key/value cache for generation, stacked over layers so it rides the layer scan.

Slots fill left to right: the prefill writes a batch's left-padded prompts, then each decode step
one token per row. Every slot keeps its token's segment id (1; 0 for an empty slot or padding), so
attention masks the cache as it masks packed batches: causal and windowed in slot order, which is
token order because the only gaps are the padding on the left. Sliding-window layers keep every
slot too (one length for all layers keeps the scan); their window is a mask, not a ring buffer.

Axis letters as in model.py: L layers, B batch, S cache slots, T new tokens, K key/value heads,
H head_dim.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from minitron_jax.models import partitioning
from minitron_jax.models.config import ModelConfig

# Logical axes of the keys and values (partitioning.LOGICAL_RULES): batch over the data axes, heads
# over the tensor axis, as the activations and the k/v projections that write them are split.
_AXES = ("layers", "batch", "length", "kv_heads", "head_dim")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """keys, values [L,B,S,K,H]; segment_ids [L,B,S] int32; end [L] int32: slots filled.

  Inside the layer scan each layer sees its own slice (no L axis). Every layer writes the same
  segment ids and end; keeping a copy per layer lets the whole cache ride the scan as one pytree.
  `prefill`: nothing is cached yet, so the new tokens attend only to each other and any attention
  kernel computes it (a flash kernel for a long prompt, not a [T,S] score tensor).
  """

  keys: jax.Array
  values: jax.Array
  segment_ids: jax.Array
  end: jax.Array
  prefill: bool = dataclasses.field(default=True, metadata=dict(static=True))

  @classmethod
  def create(cls, config: ModelConfig, batch: int, length: int) -> "KVCache":
    """An empty cache of `length` slots per row in the compute dtype, split over the mesh in
    context (`jax.set_mesh`) like the batch and the heads."""
    shape = (config.num_layers, batch, length, config.num_key_value_heads, config.head_dim)
    zeros = lambda: _shard(jnp.zeros(shape, jnp.dtype(config.dtype)))
    return cls(keys=zeros(), values=zeros(),
               segment_ids=jnp.zeros(shape[:3], jnp.int32),
               end=jnp.zeros((config.num_layers,), jnp.int32))

  def update(self, k: jax.Array, v: jax.Array, segment_ids: jax.Array):
    """One layer's cache: k and v [B,T,K,H] of T new tokens with segment_ids [B,T] go into
    slots end..end+T-1. -> (the updated cache, (keys, values, key_segment_ids, query_start)
    for attention.attend: the new tokens alone at prefill, else every slot)."""
    write = lambda buffer, new: jax.lax.dynamic_update_slice_in_dim(
        buffer, new.astype(buffer.dtype), self.end, axis=1)
    cache = KVCache(write(self.keys, k), write(self.values, v),
                    write(self.segment_ids, segment_ids), self.end + k.shape[1], prefill=False)
    if self.prefill:
      return cache, (k, v, None, 0)
    return cache, (cache.keys, cache.values, cache.segment_ids, self.end)


def _shard(x: jax.Array) -> jax.Array:
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, partitioning.logical_to_spec(_AXES, x.shape, mesh))
