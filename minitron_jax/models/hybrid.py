"""The layer stack of a hybrid model (Nemotron-H): layer i is ONE block of kind
`config.layer_kinds[i]` (attention, a Mamba-2 mixer or an MLP), each with its own pre-norm and
residual: y = x + block(norm(x)).

Layers of one kind are stacked on a leading axis (params["layers"][kind], [L_kind, ...]). The
stack runs as one `lax.scan` over every layer in order whose body is a `lax.switch` on the
layer's kind, reading that kind's weights at the layer's index among its kind: each kind's block
is compiled once, so compile time does not grow with depth, and each step runs only its own
block (the kind is not batched, so the switch stays a conditional).

Every kind exposes the same intermediates (the switch needs one structure): layer_input and
layer_output [B,T,D], what Block Importance ranks depth by.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import dataclasses

from minitron_jax.models import attention, kv_cache, layers, mamba2
from minitron_jax.models.config import LAYER_KINDS, ModelConfig


class AttentionBlock(nnx.Module):
  def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
    self.norm = _norm(config, rngs)
    self.attn = attention.Attention(config, rngs)

  def __call__(self, x, cos, sin, segment_ids, window, cache=None):
    return self.attn(self.norm(x), cos, sin, segment_ids, window, cache)[::2]


class MambaBlock(nnx.Module):
  def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
    self.norm = _norm(config, rngs)
    self.mixer = mamba2.Mamba2Mixer(config.mamba, config.hidden_size, config.norm_eps,
                                    config.param_dtype, rngs)

  def __call__(self, x, cos, sin, segment_ids, window, cache=None):
    return self.mixer(self.norm(x), segment_ids, cache)[::2]


class MLPBlock(nnx.Module):
  def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
    self.norm = _norm(config, rngs)
    self.mlp = layers.MLP(config, rngs)

  def __call__(self, x, cos, sin, segment_ids, window, cache=None):
    return self.mlp(self.norm(x))[0], None


BLOCKS = {"attention": AttentionBlock, "mamba": MambaBlock, "mlp": MLPBlock}
assert tuple(BLOCKS) == LAYER_KINDS


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HybridCache:
  """What generation carries per kind: the attention layers' keys and values
  (kv_cache.KVCache stacked over them) and the Mamba layers' states (mamba2.MambaCache stacked
  over them); None for a kind the model lacks. MLP layers keep nothing."""

  attention: kv_cache.KVCache | None
  mamba: mamba2.MambaCache | None

  @classmethod
  def create(cls, config: ModelConfig, batch: int, length: int) -> "HybridCache":
    count = config.layer_kinds.count
    kv = None
    if count("attention"):
      kv = kv_cache.KVCache.create(config.replace(num_layers=count("attention"), layer_kinds=None,
                                                  mamba=None), batch, length)
    states = None
    if count("mamba"):
      one = mamba2.MambaCache.zeros(config.mamba, batch)
      states = jax.tree.map(lambda a: jnp.broadcast_to(a, (count("mamba"),) + a.shape), one)
    return cls(kv, states)


def _norm(config: ModelConfig, rngs: nnx.Rngs) -> layers.Norm:
  return layers.Norm(config.hidden_size, config.norm, config.norm_eps,
                     jnp.dtype(config.param_dtype), rngs, "embed")


def kinds_present(config: ModelConfig) -> tuple[str, ...]:
  """The kinds the model has, in LAYER_KINDS order (the branches of the switch)."""
  return tuple(kind for kind in LAYER_KINDS if kind in config.layer_kinds)


def layer_schedule(config: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
  """(branch [L], index among its kind [L]) int32: which block each layer runs and where its
  weights sit in that kind's stack."""
  present = kinds_present(config)
  branch = np.asarray([present.index(kind) for kind in config.layer_kinds], np.int32)
  seen = {kind: 0 for kind in present}
  index = []
  for kind in config.layer_kinds:
    index.append(seen[kind])
    seen[kind] += 1
  return branch, np.asarray(index, np.int32)


def _stacked(config: ModelConfig, kind: str, rngs: nnx.Rngs) -> nnx.Module:
  @nnx.split_rngs(splits=config.layer_kinds.count(kind))
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def make(rngs: nnx.Rngs):
    return BLOCKS[kind](config, rngs)
  return make(rngs)


class HybridLayers(nnx.Module):
  """One stack per kind present, each `nnx.vmap`-ed over that kind's layer count."""

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
    self.config = config
    for kind in kinds_present(config):
      setattr(self, kind, _stacked(config, kind, rngs))

  def __call__(self, x, tables, segment_ids, window, intermediates_fn=None,
               constrain=lambda a: a, cache: HybridCache | None = None):
    """x [B,T,D] -> (x after every layer, stacked intermediates_fn outputs or None; with
    `cache`, the cache holding these tokens too in their place).

    `tables`: (cos, sin) for attention (rope.rotary_tables); `constrain` re-applies the batch sharding between
    layers (model.shard_batch_axis)."""
    cfg = self.config
    present = kinds_present(cfg)
    cos, sin = tables
    splits = {kind: nnx.split(getattr(self, kind)) for kind in present}
    take = lambda tree, i: jax.tree.map(  # noqa: E731
        lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), tree)
    # The cache's static prefill flag must not change inside the switch (every branch returns
    # one structure): a layer's KVCache comes back with the stack's flag, cleared after the scan.
    prefill = cache is not None and cache.attention is not None and cache.attention.prefill

    def branch_for(kind):
      graphdef, stacked = splits[kind]

      def run(index, h, caches):
        block = nnx.merge(graphdef, take(stacked, index))
        own = None if caches is None else getattr(caches, kind, None)
        out, new_own = block(h, cos, sin, segment_ids, window,
                             None if own is None else take(own, index))
        if own is not None:
          if kind == "attention":
            new_own = dataclasses.replace(new_own, prefill=prefill)
          own = jax.tree.map(lambda s, n: jax.lax.dynamic_update_index_in_dim(
              s, n.astype(s.dtype), index, 0), own, new_own)
          caches = dataclasses.replace(caches, **{kind: own})
        return h + out, caches
      return run

    branches = [branch_for(kind) for kind in present]

    def body(carry, xs):
      h, caches = carry
      branch, index = xs
      h = constrain(h)
      y, caches = jax.lax.switch(branch, branches, index, h, caches)
      y = constrain(y)
      inter = dict(layer_input=h, layer_output=y)
      return (y, caches), (intermediates_fn(inter) if intermediates_fn is not None else None)

    if cfg.remat == "full":
      body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
    elif cfg.remat == "dots":
      body = jax.checkpoint(body, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    branch, index = layer_schedule(cfg)
    (x, cache), stacked = jax.lax.scan(body, (x, cache), (jnp.asarray(branch), jnp.asarray(index)))
    if cache is None:
      return x, stacked
    if cache.attention is not None:
      cache = dataclasses.replace(cache, attention=dataclasses.replace(cache.attention,
                                                                       prefill=False))
    return x, cache
