"""Expert dispatch on a mesh: each device routes its own tokens, sends every expert's share to the
device that holds that expert (one all-to-all over the `expert` axis), computes only its own
experts, and sends the outputs back the same way.

Under GSPMD the dispatch of moe.py sorts the whole batch's (token, expert) pairs on every device:
the router's choices and the tokens are all-gathered, so expert parallelism saved memory but not
work or communication. Here the pairs a device sorts are its own, and what travels is a capacity
buffer per destination ([expert shards, local experts, C, D], GShard's layout) instead of the
batch. With C = the device's tokens (no capacity factor) no pair is ever dropped and the result
equals moe.experts' exact dispatch; with a capacity factor, C follows from the device's tokens
and a device drops its own later pairs first. The experts' width may also be split over `tensor`
(each device computes a slice of every expert's MLP; the down projection's partial outputs are
summed over it).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, PartitionSpec as P

from minitron_jax.models import partitioning


@dataclasses.dataclass(frozen=True)
class ExpertLayout:
  mesh: AbstractMesh
  token_spec: P  # of the token dims [B, T]
  expert_axis: str | None  # splits the experts (and is one of the token axes)
  width_axis: str | None  # splits every expert's width F


def _split(entry, mesh) -> tuple[str, ...]:
  if entry is None:
    return ()
  return tuple(a for a in ((entry,) if isinstance(entry, str) else entry) if mesh.shape[a] > 1)


def token_rows(lead: tuple[int, ...]) -> tuple[AbstractMesh, P] | None:
  """(mesh in context, spec of an array [*lead, ...] with its token dims split) when the mesh
  splits tokens of this shape; None otherwise."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1 or mesh.manual_axes:
    return None
  spec = partitioning.logical_to_spec(("batch",) + ("length",) * (len(lead) - 1), lead, mesh)
  if not any(_split(entry, mesh) for entry in spec):
    return None
  return mesh, P(*spec, None)


def choose(tokens: tuple[int, int], gate_shape: tuple[int, int, int]) -> ExpertLayout | None:
  """The layout for tokens [B, T] and experts [E, D, F] on the mesh in context; None without a
  mesh (one device) or when the batch is not split over the expert axis (GSPMD then places it)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1 or mesh.manual_axes:
    return None
  token_spec = partitioning.logical_to_spec(("batch", "length"), tokens, mesh)
  token_axes = _split(token_spec[0], mesh) + _split(token_spec[1], mesh)
  weight_spec = partitioning.logical_to_spec(("experts", "embed", "moe_mlp"), gate_shape, mesh)
  expert_axes, width_axes = _split(weight_spec[0], mesh), _split(weight_spec[2], mesh)
  if len(expert_axes) > 1 or len(width_axes) > 1 or any(a in token_axes for a in width_axes):
    return None
  expert_axis = expert_axes[0] if expert_axes else None
  if expert_axis is not None and expert_axis not in token_axes:
    return None  # every device would hold every token: nothing to exchange
  if not token_axes:
    return None
  return ExpertLayout(mesh, token_spec, expert_axis, width_axes[0] if width_axes else None)


def experts(layout: ExpertLayout, x: jax.Array, indices: jax.Array, gate_proj: jax.Array,
            up_proj: jax.Array, down_proj: jax.Array, activation: Callable[[jax.Array], jax.Array],
            slots: Callable[[int], int]) -> tuple[jax.Array, jax.Array]:
  """moe.experts on the mesh: x [B,T,D], indices [B,T,K], gate_proj / up_proj [E,D,F],
  down_proj [E,F,D] -> (outputs [B,T,K,D], activations [B,T,K,F]). slots(n): the pairs each
  expert takes from a device holding n tokens."""
  num_experts = gate_proj.shape[0]
  e_axis, f_axis = layout.expert_axis, layout.width_axis
  rows = P(*layout.token_spec, None)
  weights_in, weights_out = P(e_axis, None, f_axis), P(e_axis, f_axis, None)

  def per_device(x, indices, gate_proj, up_proj, down_proj):
    b, t, d = x.shape
    k = indices.shape[-1]
    local_experts = gate_proj.shape[0]
    shards = num_experts // local_experts
    flat = indices.reshape(-1)  # [M] this device's pairs
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    routed = jnp.take(x.reshape(b * t, d), order // k, axis=0)  # [M,D] sorted by expert
    capacity = slots(b * t)
    expert = jnp.take(flat, order)
    rank = jnp.arange(flat.shape[0]) - jnp.take(jnp.cumsum(group_sizes) - group_sizes, expert)
    rank = jnp.where(rank < capacity, rank, capacity)  # past the capacity: dropped
    send = jnp.zeros((num_experts, capacity, d), x.dtype).at[expert, rank].set(routed, mode="drop")
    # [S,E',C,D]: S expert shards, E' experts each; after the exchange S is the source device.
    buffer = send.reshape(shards, local_experts, capacity, d)
    if e_axis is not None:
      buffer = jax.lax.all_to_all(buffer, e_axis, 0, 0, tiled=True)
    hidden = activation(jnp.einsum("SECD,EDF->SECF", buffer, gate_proj)) * jnp.einsum(
        "SECD,EDF->SECF", buffer, up_proj)
    out_buffer = jnp.einsum("SECF,EFD->SECD", hidden, down_proj)
    if f_axis is not None:  # each device holds a slice of every expert's width
      out_buffer = jax.lax.psum(out_buffer, f_axis)
    if e_axis is not None:  # back to the devices the pairs came from
      out_buffer = jax.lax.all_to_all(out_buffer, e_axis, 0, 0, tiled=True)
      hidden = jax.lax.all_to_all(hidden, e_axis, 0, 0, tiled=True)
    out_buffer = out_buffer.reshape(num_experts, capacity, d)
    hidden = hidden.reshape(num_experts, capacity, hidden.shape[-1])
    out = out_buffer.at[expert, rank].get(mode="fill", fill_value=0)  # [M,D]
    act = hidden.at[expert, rank].get(mode="fill", fill_value=0)  # [M,F']
    out = jnp.zeros_like(out).at[order].set(out, unique_indices=True).reshape(b, t, k, d)
    act = jnp.zeros_like(act).at[order].set(act, unique_indices=True).reshape(b, t, k, -1)
    return out, act

  return jax.shard_map(
      per_device, mesh=layout.mesh,
      in_specs=(rows, rows, weights_in, weights_in, weights_out),
      out_specs=(P(*layout.token_spec, None, None), P(*layout.token_spec, None, f_axis)),
      check_vma=False)(x, indices, gate_proj, up_proj, down_proj)

