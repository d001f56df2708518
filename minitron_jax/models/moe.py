"""The mixture-of-experts block (`MixtureOfExperts`) and its pieces as pure functions: top-k
routing, grouped expert matmuls and the router's load-balancing loss.

Axis letters (as in model.py): B batch, T positions, D hidden, E experts, K experts per token
(top-k), F expert width, M = B*T*K routed (token, expert) pairs.

Two dispatches, neither with a loop over experts; both sort the M pairs by expert first.
- Grouped: each projection is one grouped matmul (`jax.lax.ragged_dot`); every token reaches
  exactly its K experts and nothing is dropped. TPUs do M x D x F work; XLA's lowering on CPU,
  and on an H100 under jax 0.11.2, was slower than the capacity path below at every E measured
  (6-8x at D=2048, F=768 on the H100; BENCHMARKS.md).
- Capacity C per expert: pairs are packed into an [E,C,D] buffer and each projection is one
  batched matmul, E x C x D x F work on every backend, split over the `expert` mesh axis with
  the experts. Pairs beyond an expert's C (later tokens first) are dropped, as in Switch
  Transformer and GShard; C = B*T (every token, capacity factor E/K) never drops and equals the
  grouped path.
- Tokamax: the grouped dispatch with tokamax.ragged_dot (tokamax_kernels.py), Google's Mosaic
  GPU grouped-matmul kernel on H100 / B200, M x D x F work; needs the `cuda` extra.
Without a capacity factor the dispatch is exact; "auto" picks it in one place, _auto_dispatch:
grouped on TPU, capacity B*T elsewhere; with AUTO_GPU_GROUPED on, tokamax on sm90/sm100 GPUs
where installed and no multi-device mesh is in context. The switch is off until tokamax has run on
a GPU: gpu_suite.py times every dispatch (part e), and its figures decide it.
On a mesh the capacity dispatch runs per device, with an all-to-all over the `expert` axis
(moe_parallel.py); its capacity then counts the device's own tokens.
Capacity B*T holds an [E,B*T,D] buffer, E/K times the routed pairs: at large E set a capacity
factor (`moe_capacity_factor`).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from minitron_jax.models import layers, moe_parallel, tokamax_kernels
from minitron_jax.models.config import ModelConfig

# Whether "auto" runs tokamax's grouped matmul on a GPU whose kernel takes both directions
# (off until measured on a GPU; see the module docstring).
AUTO_GPU_GROUPED = False


def route(router_logits: jax.Array, top_k: int, normalize: bool) -> tuple[jax.Array, jax.Array]:
  """router_logits [B,T,E] (or [...,E]) -> (weights [...,K] float32, expert indices [...,K] int32).

  Softmax over every expert in float32, then the K largest; `normalize` rescales those K to sum
  to one (Mixtral, Qwen3-MoE's norm_topk_prob). On a mesh each device routes its own tokens
  (GSPMD gathered the whole batch's probabilities for top-k's gradient)."""
  rows = moe_parallel.token_rows(router_logits.shape[:-1])
  if rows is None:
    return _route(router_logits, top_k, normalize)
  mesh, spec = rows
  return jax.shard_map(lambda z: _route(z, top_k, normalize), mesh=mesh, in_specs=spec,
                       out_specs=(spec, spec), check_vma=False)(router_logits)


def _route(router_logits, top_k, normalize):
  probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
  weights, indices = jax.lax.top_k(probs, top_k)
  if normalize:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return weights, indices.astype(jnp.int32)


def capacity(tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
  """Routed pairs each expert takes: capacity_factor x its even share, at most every token."""
  return max(1, min(tokens, math.ceil(capacity_factor * tokens * top_k / num_experts)))


def experts(x: jax.Array, indices: jax.Array, gate_proj: jax.Array, up_proj: jax.Array,
            down_proj: jax.Array, activation: Callable[[jax.Array], jax.Array],
            capacity_factor: float | None = None, implementation: str = "auto"
            ) -> tuple[jax.Array, jax.Array]:
  """Each token through each of its K experts (gated MLPs), unweighted.

  implementation: "grouped", "tokamax", "capacity" (every token when capacity_factor is None) or
  "auto" (see the module docstring; _auto_dispatch).

  x [B,T,D], indices [B,T,K], gate_proj / up_proj [E,D,F], down_proj [E,F,D] ->
  (outputs [B,T,K,D], activations [B,T,K,F] that feed each expert's down_proj; zero for a pair
  dropped by the capacity).
  """
  b, t, d = x.shape
  k = indices.shape[-1]
  num_experts = gate_proj.shape[0]
  layout = moe_parallel.choose((b, t), gate_proj.shape)
  if layout is not None and implementation in ("auto", "capacity"):
    slots = lambda n: n if capacity_factor is None else capacity(n, k, num_experts,  # noqa: E731
                                                                 capacity_factor)
    return moe_parallel.experts(layout, x, indices, gate_proj, up_proj, down_proj, activation,
                                slots)
  flat = indices.reshape(-1)  # [M]
  order = jnp.argsort(flat, stable=True)  # pairs grouped by expert, in token order within one
  group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)  # [E]
  routed = jnp.take(x.reshape(b * t, d), order // k, axis=0)  # [M,D], sorted
  if implementation == "auto":
    implementation = _auto_dispatch(capacity_factor)
  if implementation in ("grouped", "tokamax"):
    matmul = jax.lax.ragged_dot if implementation == "grouped" else tokamax_kernels.ragged_dot
    gate = matmul(routed, gate_proj, group_sizes)  # [M,F]
    up = matmul(routed, up_proj, group_sizes)
    act = activation(gate) * up
    out = matmul(act, down_proj, group_sizes)  # [M,D]
  else:
    slots = (b * t if capacity_factor is None
             else capacity(b * t, k, num_experts, capacity_factor))
    expert = jnp.take(flat, order)  # [M], sorted
    starts = jnp.cumsum(group_sizes) - group_sizes
    rank = jnp.arange(flat.shape[0]) - jnp.take(starts, expert)  # place in the expert's queue
    rank = jnp.where(rank < slots, rank, slots)  # past the capacity: an index that drops
    buffer = jnp.zeros((num_experts, slots, d), x.dtype).at[expert, rank].set(routed, mode="drop")
    hidden = activation(jnp.einsum("ECD,EDF->ECF", buffer, gate_proj)) * jnp.einsum(
        "ECD,EDF->ECF", buffer, up_proj)
    out_buffer = jnp.einsum("ECF,EFD->ECD", hidden, down_proj)
    out = out_buffer.at[expert, rank].get(mode="fill", fill_value=0)  # [M,D]
    act = hidden.at[expert, rank].get(mode="fill", fill_value=0)  # [M,F]
  # Back to (token, k) order: a scatter by the sort's permutation, not a second sort.
  out = jnp.zeros_like(out).at[order].set(out, unique_indices=True).reshape(b, t, k, d)
  act = jnp.zeros_like(act).at[order].set(act, unique_indices=True).reshape(b, t, k, -1)
  return out, act


def _auto_dispatch(capacity_factor: float | None) -> str:
  """"auto" on one device: an exact grouped matmul where a fast kernel exists, else capacity."""
  if capacity_factor is not None:
    return "capacity"
  if jax.default_backend() == "tpu":
    return "grouped"
  if (jax.default_backend() == "gpu" and AUTO_GPU_GROUPED and tokamax_kernels.available()
      and tokamax_kernels.unsharded() and tokamax_kernels.grouped_kernel() == "mosaic"):
    return "tokamax"
  return "capacity"


def load_balancing_loss(router_logits: jax.Array, top_k: int,
                        valid: jax.Array | None = None) -> jax.Array:
  """Switch Transformer's auxiliary loss over every layer's routing, as transformers computes it.

  router_logits [L,B,T,E]; valid [B,T] (False: padding, left out). With f_e the fraction of
  routed (token, k) assignments that go to expert e and p_e its mean routing probability, both
  over every layer's valid tokens: E * sum_e f_e * p_e. It is K at perfectly even routing.
  """
  num_experts = router_logits.shape[-1]
  probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)  # [L,B,T,E]
  _, chosen = jax.lax.top_k(probs, top_k)  # [L,B,T,K]
  counts = jnp.sum(jax.nn.one_hot(chosen, num_experts, dtype=jnp.float32), axis=-2)  # [L,B,T,E]
  if valid is None:
    valid = jnp.ones(router_logits.shape[1:3], bool)
  weight = jnp.broadcast_to(valid.astype(jnp.float32)[None, ..., None], probs.shape[:-1] + (1,))
  rows = jnp.maximum(jnp.sum(weight), 1.0)
  tokens_per_expert = jnp.sum(counts * weight, axis=(0, 1, 2)) / rows  # [E]
  prob_per_expert = jnp.sum(probs * weight, axis=(0, 1, 2)) / rows  # [E]
  return num_experts * jnp.sum(tokens_per_expert * prob_per_expert)


# ----------------------------------------------------------------------------- the block


class MixtureOfExperts(nnx.Module):
  """A router picks each token's top-k of `num_experts` gated MLPs and mixes their outputs by
  its softmax weights (`experts` dispatches them); Qwen2-MoE adds a shared expert every token
  passes through, scaled by sigmoid(x . shared_gate)."""

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
    d, e, f = config.hidden_size, config.num_experts, config.moe_intermediate_size
    dtype = jnp.dtype(config.param_dtype)
    self.config = config
    self.router = layers.param(rngs, (d, e), ("embed", "experts"), dtype)
    self.gate_proj = layers.param(rngs, (e, d, f), ("experts", "embed", "moe_mlp"), dtype)
    self.up_proj = layers.param(rngs, (e, d, f), ("experts", "embed", "moe_mlp"), dtype)
    self.down_proj = layers.param(rngs, (e, f, d), ("experts", "moe_mlp", "embed"), dtype)
    if config.shared_expert_intermediate_size:
      self.shared = layers.MLP(config, rngs, width=config.shared_expert_intermediate_size,
                        axis="shared_mlp")
      self.shared_gate = layers.param(rngs, (d, 1), ("embed", "unit"), dtype)

  def __call__(self, x) -> tuple[jax.Array, dict[str, jax.Array]]:
    """x [B,T,D] -> (output [B,T,D], the routing intermediates listed at the top of model.py)."""
    cfg, dt = self.config, x.dtype
    # Routing is discontinuous: logits rounded to bf16 would flip near-tied experts, so they
    # keep float32 (transformers rounds them to the compute dtype; fp32 runs are identical).
    logits = jnp.einsum("BTD,DE->BTE", x, self.router[...].astype(dt),
                        preferred_element_type=jnp.float32)
    weights, indices = route(logits, cfg.num_experts_per_tok, cfg.norm_topk_prob)
    weights = weights.astype(dt)  # transformers casts them to the router's dtype too
    outputs, act = experts(x, indices, self.gate_proj[...].astype(dt),
                               self.up_proj[...].astype(dt), self.down_proj[...].astype(dt),
                               layers.ACTIVATIONS[cfg.activation], cfg.moe_capacity_factor,
                               implementation=cfg.moe_dispatch)
    out = jnp.einsum("BTKD,BTK->BTD", outputs, weights)
    inter = dict(router_logits=logits, expert_index=indices, expert_weight=weights,
                 expert_act=act, expert_output=outputs)
    if cfg.shared_expert_intermediate_size:
      shared, inter["shared_act"] = self.shared(x)
      gate = jax.nn.sigmoid(jnp.einsum("BTD,DO->BTO", x, self.shared_gate[...].astype(dt)))
      out = out + gate * shared
    return out, inter
