"""The decoder in Flax NNX, with a pure-function face: params are a plain nested dict.

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

from minitron_jax.models import attention, moe, partitioning
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

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu2": lambda x: jnp.square(jax.nn.relu(x)),
}


def _param(rngs: nnx.Rngs, shape, axes, dtype, init: str = "normal") -> nnx.Param:
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
    self.scale = _param(rngs, (size,), (axis,), dtype, "ones" if kind == "rms" else "zeros")
    self.bias = _param(rngs, (size,), (axis,), dtype, "zeros") if kind == "layernorm1p" else None

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
  """cos, sin of shape [B,T,rotary_dim] in float32 (the two halves repeat, as in rotate-half RoPE)."""
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


class Attention(nnx.Module):
  """Grouped-query attention; query head n reads key/value head n // queries_per_group."""

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
    d, n, k, h = (config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                  config.head_dim)
    dtype = jnp.dtype(config.param_dtype)
    self.config = config
    self.q_proj = _param(rngs, (d, n, h), ("embed", "q_heads", "head_dim"), dtype)
    self.k_proj = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), dtype)
    self.v_proj = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), dtype)
    self.o_proj = _param(rngs, (n, h, d), ("q_heads", "head_dim", "embed"), dtype)
    if config.qkv_bias:
      self.q_bias = _param(rngs, (n, h), ("q_heads", "head_dim"), dtype, "zeros")
      self.k_bias = _param(rngs, (k, h), ("kv_heads", "head_dim"), dtype, "zeros")
      self.v_bias = _param(rngs, (k, h), ("kv_heads", "head_dim"), dtype, "zeros")
    if config.o_bias:
      self.o_bias = _param(rngs, (d,), ("embed",), dtype, "zeros")
    if config.qk_norm:
      kind = "rms1p" if config.norm == "rms1p" else "rms"  # Gemma 3 offsets these by one too
      self.q_norm = Norm(h, kind, config.norm_eps, dtype, rngs, axis="head_dim")
      self.k_norm = Norm(h, kind, config.norm_eps, dtype, rngs, axis="head_dim")

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
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    key_segment_ids, query_start = None, 0
    if cache is not None:
      cache, (k, v, key_segment_ids, query_start) = cache.update(k, v, segment_ids)
    b, t, _, h = q.shape
    q = q.reshape(b, t, cfg.num_key_value_heads, cfg.queries_per_group, h)
    scale = (cfg.query_pre_attn_scalar or h) ** -0.5
    heads = attention.attend(q, k, v, segment_ids=segment_ids, window=window, scale=scale,
                             implementation=cfg.attention, block_size=cfg.attention_block_size,
                             softcap=cfg.attn_logit_softcap, key_segment_ids=key_segment_ids,
                             query_start=query_start)
    heads = heads.reshape(b, t, cfg.num_attention_heads, h)
    out = jnp.einsum("BTNH,NHD->BTD", heads, self.o_proj[...].astype(dt))
    if cfg.o_bias:
      out = out + self.o_bias[...].astype(dt)
    return out, heads, cache


class MLP(nnx.Module):
  """Gated (SwiGLU-style) or plain (Nemotron relu²) feed-forward block; `width` and `axis` name
  another one of its kind (a mixture's shared expert)."""

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs, width: int | None = None,
               axis: str = "mlp"):
    d, f = config.hidden_size, width or config.intermediate_size
    dtype = jnp.dtype(config.param_dtype)
    self.config = config
    if config.gated_mlp:
      self.gate_proj = _param(rngs, (d, f), ("embed", axis), dtype)
    self.up_proj = _param(rngs, (d, f), ("embed", axis), dtype)
    self.down_proj = _param(rngs, (f, d), (axis, "embed"), dtype)
    if config.mlp_bias:
      if config.gated_mlp:
        self.gate_bias = _param(rngs, (f,), (axis,), dtype, "zeros")
      self.up_bias = _param(rngs, (f,), (axis,), dtype, "zeros")
      self.down_bias = _param(rngs, (d,), ("embed",), dtype, "zeros")

  def __call__(self, x) -> tuple[jax.Array, jax.Array]:
    """x [B,T,D] -> (output [B,T,D], activation [B,T,F] that feeds down_proj)."""
    cfg, dt = self.config, x.dtype

    def project(name: str) -> jax.Array:
      y = jnp.einsum("BTD,DF->BTF", x, getattr(self, f"{name}_proj")[...].astype(dt))
      return y + getattr(self, f"{name}_bias")[...].astype(dt) if cfg.mlp_bias else y

    act = _ACTIVATIONS[cfg.activation](project("up") if not cfg.gated_mlp else project("gate"))
    if cfg.gated_mlp:
      act = act * project("up")
    out = jnp.einsum("BTF,FD->BTD", act, self.down_proj[...].astype(dt))
    if cfg.mlp_bias:
      out = out + self.down_bias[...].astype(dt)
    return out, act


class MixtureOfExperts(nnx.Module):
  """A router picks each token's top-k of `num_experts` gated MLPs and mixes their outputs by
  its softmax weights (moe.py dispatches them); Qwen2-MoE adds a shared expert every token
  passes through, scaled by sigmoid(x . shared_gate)."""

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
    d, e, f = config.hidden_size, config.num_experts, config.moe_intermediate_size
    dtype = jnp.dtype(config.param_dtype)
    self.config = config
    self.router = _param(rngs, (d, e), ("embed", "experts"), dtype)
    self.gate_proj = _param(rngs, (e, d, f), ("experts", "embed", "moe_mlp"), dtype)
    self.up_proj = _param(rngs, (e, d, f), ("experts", "embed", "moe_mlp"), dtype)
    self.down_proj = _param(rngs, (e, f, d), ("experts", "moe_mlp", "embed"), dtype)
    if config.shared_expert_intermediate_size:
      self.shared = MLP(config, rngs, width=config.shared_expert_intermediate_size,
                        axis="shared_mlp")
      self.shared_gate = _param(rngs, (d, 1), ("embed", "unit"), dtype)

  def __call__(self, x) -> tuple[jax.Array, Intermediates]:
    """x [B,T,D] -> (output [B,T,D], the routing intermediates listed at the top of model.py)."""
    cfg, dt = self.config, x.dtype
    # Routing is discontinuous: logits rounded to bf16 would flip near-tied experts, so they
    # keep float32 (transformers rounds them to the compute dtype; fp32 runs are identical).
    logits = jnp.einsum("BTD,DE->BTE", x, self.router[...].astype(dt),
                        preferred_element_type=jnp.float32)
    weights, indices = moe.route(logits, cfg.num_experts_per_tok, cfg.norm_topk_prob)
    weights = weights.astype(dt)  # transformers casts them to the router's dtype too
    outputs, act = moe.experts(x, indices, self.gate_proj[...].astype(dt),
                               self.up_proj[...].astype(dt), self.down_proj[...].astype(dt),
                               _ACTIVATIONS[cfg.activation], cfg.moe_capacity_factor,
                               implementation=cfg.moe_dispatch)
    out = jnp.einsum("BTKD,BTK->BTD", outputs, weights)
    inter = dict(router_logits=logits, expert_index=indices, expert_weight=weights,
                 expert_act=act, expert_output=outputs)
    if cfg.shared_expert_intermediate_size:
      shared, inter["shared_act"] = self.shared(x)
      gate = jax.nn.sigmoid(jnp.einsum("BTD,DO->BTO", x, self.shared_gate[...].astype(dt)))
      out = out + gate * shared
    return out, inter


class DecoderLayer(nnx.Module):
  """Pre-norm attention and MLP blocks; with post_norms each output is normalised again (Gemma 2/3)."""

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
    dtype = jnp.dtype(config.param_dtype)
    norm = lambda: Norm(config.hidden_size, config.norm, config.norm_eps, dtype, rngs, "embed")
    self.post_norms = config.post_norms
    self.attn_norm = norm()
    self.attn = Attention(config, rngs)
    self.mlp_norm = norm()
    if config.is_moe:
      self.moe = MixtureOfExperts(config, rngs)
    else:
      self.mlp = MLP(config, rngs)
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
    self.embed = _param(rngs, (config.vocab_size, config.hidden_size), ("vocab", "embed"), dtype)

    @nnx.split_rngs(splits=config.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_layers(rngs: nnx.Rngs) -> DecoderLayer:
      return DecoderLayer(config, rngs)

    self.layers = make_layers(rngs)
    self.final_norm = Norm(config.hidden_size, config.norm, config.norm_eps, dtype, rngs, "embed")
    if not config.tie_word_embeddings:
      self.lm_head = _param(rngs, (config.hidden_size, config.vocab_size), ("embed", "vocab"),
                            dtype)

  def __call__(self, tokens, segment_ids, positions, intermediates_fn=None, cache=None):
    """tokens [B,T] -> (final normed hidden [B,T,D], per-layer intermediates_fn outputs or None).

    `cache`: a kv_cache.KVCache stacked over layers, scanned with them (see `decode`)."""
    cfg = self.config
    dt = jnp.dtype(cfg.dtype)
    x = shard_batch_axis(jnp.take(_whole_rows(self.embed[...]), shard_batch_axis(tokens),
                                  axis=0).astype(dt))
    if cfg.embedding_scale is not None:
      # transformers rounds the scale to the compute dtype first (sqrt(3072) is 55.5 in bf16).
      x = x * jnp.asarray(cfg.embedding_scale, jnp.float32).astype(dt)
    tables = rotary_tables(cfg, positions)
    local_layers = cfg.local_rope_layers()
    # Gemma 3: local layers rotate at their own base; one table per kind, picked per layer.
    local_tables = rotary_tables(cfg, positions, local=True) if any(local_layers) else None
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
  """x [B,...] with B split as `partitioning.batch_sharding` splits a batch, over the mesh in context
  (`jax.set_mesh`); unchanged without a mesh.

  Without it GSPMD follows the weights, whose embed axis FSDP splits, and every device holds
  (and computes) the whole batch's activations.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  spec = partitioning.logical_to_spec(("batch",) + ("length",) * (x.ndim - 1), x.shape, mesh)
  return jax.lax.with_sharding_constraint(x, spec)


def _whole_rows(table: jax.Array) -> jax.Array:
  """An embedding table [V,D] with D whole on every device (FSDP splits it), for a lookup.

  Gathering the table's columns costs a weight all-gather, as every FSDP matmul does; without it
  GSPMD gathers every device's token ids instead, and each device looks up the whole batch.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return table
  return jax.lax.with_sharding_constraint(
      table, partitioning.logical_to_spec(("vocab", "length"), table.shape, mesh))


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
