"""The decoder in Flax NNX, with a pure-function face: params are a plain nested dict.

A layer is an attention block (attention.py) and an MLP (layers.py) or a mixture of experts
(moe.py), each with its norms; the embedding, the scanned layer stack and the head are here.

Layers are stacked on a leading `layers` axis and run with `lax.scan`, so depth pruning is a slice
and compile time does not grow with depth. Axis letters used in einsum strings:
  B batch, T query positions, S key positions, D hidden, V vocab, F MLP intermediate,
  N query heads, K key/value heads (query groups), G queries per group, H head_dim, L layers.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minitron_jax.models import attention, hybrid, kv_cache, layers, moe, partitioning, rope
from minitron_jax.models.config import ModelConfig

Params = dict[str, Any]
# The values the layer body exposes to importance and distillation, each per layer:
#   layer_input [B,T,D], attn_norm [B,T,D], attn_heads [B,T,N,H] (before o_proj),
#   mlp_norm [B,T,D], mlp_act [B,T,F] (input of down_proj), layer_output [B,T,D];
#   with post_norms also attn_post_norm and mlp_post_norm [B,T,D] (what each branch adds).
# A mixture of experts has no mlp_act; it exposes instead router_logits [B,T,E], expert_index and
#   expert_weight [B,T,K] (the K experts each token is routed to and their weights),
#   expert_act [B,T,K,F] and expert_output [B,T,K,D] (each routed expert's down_proj input and
#   unweighted output), and with a shared expert shared_act [B,T,Fs].
# Generation (`decode`) adds kv_cache: the layer's kv_cache.KVCache holding the new tokens too.
Intermediates = dict[str, jax.Array]

class DecoderLayer(nnx.Module):
  """Pre-norm attention and MLP blocks; with post_norms each output is normalised again (Gemma 2/3)."""

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
    dtype = jnp.dtype(config.param_dtype)
    norm = lambda: layers.Norm(config.hidden_size, config.norm, config.norm_eps, dtype, rngs, "embed")
    self.post_norms = config.post_norms
    self.attn_norm = norm()
    self.attn = attention.Attention(config, rngs)
    self.mlp_norm = norm()
    if config.is_moe:
      self.moe = moe.MixtureOfExperts(config, rngs)
    else:
      self.mlp = layers.MLP(config, rngs)
    if config.post_norms:
      self.attn_post_norm = norm()
      self.mlp_post_norm = norm()

  def __call__(self, x, cos, sin, segment_ids, window,
               cache=None) -> tuple[jax.Array, Intermediates]:
    """With a `cache` (see Attention), its update comes back as intermediates["kv_cache"]."""
    attn_in = self.attn_norm(x)
    attn_out, heads, cache = self.attn(attn_in, cos, sin, segment_ids, window, cache)
    post = {}
    if self.post_norms:
      attn_out = post["attn_post_norm"] = self.attn_post_norm(attn_out)
    h = x + attn_out
    mlp_in = self.mlp_norm(h)
    if hasattr(self, "moe"):
      mlp_out, mlp_inter = self.moe(mlp_in)
    else:
      mlp_out, act = self.mlp(mlp_in)
      mlp_inter = dict(mlp_act=act)
    if self.post_norms:
      mlp_out = post["mlp_post_norm"] = self.mlp_post_norm(mlp_out)
    y = h + mlp_out
    return y, dict(layer_input=x, attn_norm=attn_in, attn_heads=heads, mlp_norm=mlp_in,
                   layer_output=y, **mlp_inter, **post,
                   **({} if cache is None else dict(kv_cache=cache)))


class Decoder(nnx.Module):
  """Embedding, `num_layers` stacked decoder layers, final norm and (untied) LM head."""

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
    dtype = jnp.dtype(config.param_dtype)
    self.config = config
    self.embed = layers.param(rngs, (config.vocab_size, config.hidden_size), ("vocab", "embed"), dtype)

    @nnx.split_rngs(splits=config.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_layers(rngs: nnx.Rngs) -> DecoderLayer:
      return DecoderLayer(config, rngs)

    # A hybrid model's layers are one block each, stacked by kind (hybrid.py).
    self.layers = (hybrid.HybridLayers(config, rngs) if config.layer_kinds is not None
                   else make_layers(rngs))
    self.final_norm = layers.Norm(config.hidden_size, config.norm, config.norm_eps, dtype, rngs, "embed")
    if not config.tie_word_embeddings:
      self.lm_head = layers.param(rngs, (config.hidden_size, config.vocab_size), ("embed", "vocab"),
                            dtype)

  def __call__(self, tokens, segment_ids, positions, intermediates_fn=None, cache=None):
    """tokens [B,T] -> (final normed hidden [B,T,D], per-layer intermediates_fn outputs or None).

    `cache`: a kv_cache.KVCache stacked over layers, scanned with them (see `decode`)."""
    cfg = self.config
    dt = jnp.dtype(cfg.dtype)
    # The table stays split as FSDP splits it (its embed axis): each device looks up its columns
    # for every token (the ids are gathered, 4 bytes a token), then the batch is split. Gathering
    # the table instead puts all of it on every device: 1 GiB in float32 for a 128K vocabulary.
    x = shard_batch_axis(jnp.take(self.embed[...], tokens, axis=0).astype(dt))
    if cfg.embedding_scale is not None:
      # transformers rounds the scale to the compute dtype first (sqrt(3072) is 55.5 in bf16).
      x = x * jnp.asarray(cfg.embedding_scale, jnp.float32).astype(dt)
    tables = rope.rotary_tables(cfg, positions)
    if cfg.layer_kinds is not None:
      # With a cache (decode), the layers give back the updated hybrid.HybridCache.
      window = cfg.sliding_window or attention.NO_WINDOW
      x, stacked = self.layers(x, tables, segment_ids, window,
                               None if cache is not None else intermediates_fn,
                               constrain=shard_batch_axis, cache=cache)
      return self.final_norm(x), stacked
    local_layers = cfg.local_rope_layers()
    # Gemma 3: local layers rotate at their own base; one table per kind, picked per layer.
    local_tables = rope.rotary_tables(cfg, positions, local=True) if any(local_layers) else None
    windows = [attention.NO_WINDOW if w is None else w for w in cfg.layer_windows()]
    # One window for every layer stays a Python int, which the fused kernels need; mixed
    # windows (Qwen2/3 layer_types) ride the scan as a traced int32 per layer.
    shared_window = windows[0] if len(set(windows)) == 1 else None

    graphdef, layer_state = nnx.split(self.layers)

    def body(carry, xs):
      state, window, local, layer_cache = xs
      layer = nnx.merge(graphdef, state)
      window = shared_window if shared_window is not None else window
      cos, sin = tables
      if any(local_layers):
        cos, sin = jax.tree.map(lambda a, b: jnp.where(local, a, b), local_tables, tables)
      y, inter = layer(shard_batch_axis(carry), cos, sin, segment_ids, window, layer_cache)
      y = shard_batch_axis(y)
      return y, (intermediates_fn(inter) if intermediates_fn is not None else None)

    if cfg.remat == "full":
      body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
    elif cfg.remat == "dots":
      body = jax.checkpoint(body, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    x, stacked = jax.lax.scan(body, x, (layer_state, jnp.asarray(windows, jnp.int32),
                                        jnp.asarray(local_layers, bool), cache))
    return self.final_norm(x), stacked


def shard_batch_axis(x: jax.Array) -> jax.Array:
  """x [B,...] with B split as `partitioning.batch_sharding` splits a batch, over the mesh in
  context (`jax.set_mesh`); unchanged without a mesh.

  Without it GSPMD follows the weights, whose embed axis FSDP splits, and every device holds
  (and computes) the whole batch's activations.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  spec = partitioning.logical_to_spec(("batch",) + ("length",) * (x.ndim - 1), x.shape, mesh)
  return jax.lax.with_sharding_constraint(x, spec)


@functools.lru_cache(maxsize=64)
def _graphdef_and_abstract_state(config: ModelConfig):
  abstract = nnx.eval_shape(lambda: Decoder(config, nnx.Rngs(0)))
  return nnx.split(abstract)


def _bind(config: ModelConfig, params: Params) -> Decoder:
  graphdef, abstract_state = _graphdef_and_abstract_state(config)
  state = jax.tree.map(lambda v: v, abstract_state)  # a fresh copy: replace_by_pure_dict mutates
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)


def _create(config: ModelConfig, seed: int) -> Params:
  return nnx.to_pure_dict(nnx.state(Decoder(config, nnx.Rngs(seed)), nnx.Param))


def init(config: ModelConfig, seed: int = 0, out_shardings=None) -> Params:
  """Random params as a plain nested dict (optionally created already sharded)."""
  # One module-level function with static arguments, so that every stage of a run that builds
  # the same model (each loads its source afresh) reuses the program instead of compiling it.
  return jax.jit(_create, static_argnums=(0, 1), out_shardings=out_shardings)(config, seed)


def abstract_params(config: ModelConfig) -> Params:
  """ShapeDtypeStructs of every weight (shape and dtype only), without allocating anything."""
  # Shapes cached while a mesh was set (jax.set_mesh) carry its abstract sharding, which would
  # mean nothing to a caller outside it (orbax cannot restore onto an abstract mesh).
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                      nnx.to_pure_dict(_graphdef_and_abstract_state(config)[1]))


def logical_axes(config: ModelConfig) -> Params:
  """A tuple of logical axis names for every weight, mirroring the params tree."""
  _, state = _graphdef_and_abstract_state(config)
  params = nnx.to_pure_dict(state)

  def visit(path, _):
    variable = state
    for key in path:
      variable = variable[key.key]
    names = tuple(variable.get_metadata()["axes"])
    return ("layers",) + names if path[0].key == "layers" else names

  return jax.tree_util.tree_map_with_path(visit, params)


def lm_head_kernel(config: ModelConfig, params: Params) -> jax.Array:
  """The [D,V] output projection (the transposed embedding when tied)."""
  return params["embed"].T if config.tie_word_embeddings else params["lm_head"]


def _defaults(tokens, segment_ids, positions):
  if segment_ids is None:
    segment_ids = jnp.ones_like(tokens, dtype=jnp.int32)
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  return segment_ids, positions


@functools.partial(jax.jit, static_argnames=("config", "intermediates_fn"))
def hidden_states(config: ModelConfig, params: Params, tokens: jax.Array, *,
                  segment_ids: jax.Array | None = None, positions: jax.Array | None = None,
                  intermediates_fn: Callable[[Intermediates], Any] | None = None):
  """Final normed hidden states [B,T,D] (compute dtype) and stacked per-layer intermediates.

  `segment_ids` [B,T]: tokens attend only within their segment; 0 marks padding.
  `positions` [B,T]: RoPE positions (restart them per packed segment).
  `intermediates_fn` maps one layer's `Intermediates` to whatever should be kept (a reduction,
  for importance); its outputs come back stacked on a leading layers axis. None keeps nothing.
  """
  segment_ids, positions = _defaults(tokens, segment_ids, positions)
  return _bind(config, params)(tokens, segment_ids, positions, intermediates_fn)


def _kv_cache(intermediates: Intermediates):
  return intermediates["kv_cache"]


def new_cache(config: ModelConfig, batch: int, length: int):
  """An empty generation cache of `length` slots per row: a kv_cache.KVCache, or for a hybrid
  model a hybrid.HybridCache (keys and values of its attention layers, states of its Mamba ones)."""
  if config.layer_kinds is not None:
    return hybrid.HybridCache.create(config, batch, length)
  return kv_cache.KVCache.create(config, batch, length)


def decode(config: ModelConfig, params: Params, tokens: jax.Array, cache, *,
           segment_ids: jax.Array, positions: jax.Array):
  """`hidden_states` for generation: tokens [B,T] continue the sequences that `cache` (a
  kv_cache.KVCache) holds -> (final normed hidden [B,T,D], the cache holding them too).

  `segment_ids` [B,T]: 1 for a token, 0 for left padding; `positions` [B,T]: their RoPE positions.
  """
  return _bind(config, params)(tokens, segment_ids, positions, _kv_cache, cache)


def soft_cap(logits: jax.Array, cap: float | None) -> jax.Array:
  """cap * tanh(logits / cap) (Gemma 2's final logits); the identity when cap is None."""
  return logits if cap is None else cap * jnp.tanh(logits / cap)


def logits_from_hidden(config: ModelConfig, params: Params, hidden: jax.Array) -> jax.Array:
  kernel = lm_head_kernel(config, params).astype(hidden.dtype)
  logits = jnp.einsum("BTD,DV->BTV", hidden, kernel, preferred_element_type=jnp.float32)
  return soft_cap(logits, config.final_logit_softcap)


def _keep_all(intermediates: Intermediates) -> Intermediates:
  return intermediates


@functools.partial(jax.jit, static_argnames=("config", "return_intermediates"))
def apply(config: ModelConfig, params: Params, tokens: jax.Array, *,
          segment_ids: jax.Array | None = None, positions: jax.Array | None = None,
          return_intermediates: bool = False):
  """Logits float32 [B,T,V]; with `return_intermediates`, also every layer's intermediates
  stacked as [L,...] plus `final_norm` [B,T,D]."""
  hidden, stacked = hidden_states(config, params, tokens, segment_ids=segment_ids,
                                  positions=positions,
                                  intermediates_fn=_keep_all if return_intermediates else None)
  logits = logits_from_hidden(config, params, hidden).astype(jnp.float32)
  if not return_intermediates:
    return logits
  return logits, {**stacked, "final_norm": hidden}
