"""Weights placed on the mesh: a NamedSharding for every weight from its logical axes, and params
put there. The mesh, its logical-axis rules and a batch's sharding are partitioning.py's."""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding

from minitron_jax.core import distributed
from minitron_jax.models import model as model_lib
from minitron_jax.models.config import ModelConfig
from minitron_jax.models.partitioning import LOGICAL_RULES, logical_to_spec


def param_shardings(config: ModelConfig, mesh: Mesh, rules=LOGICAL_RULES):
  """A NamedSharding for every weight, mirroring the params tree."""
  shapes = model_lib.abstract_params(config)
  return jax.tree.map(
      lambda axes, leaf: NamedSharding(mesh, logical_to_spec(axes, leaf.shape, mesh, rules)),
      model_lib.logical_axes(config), shapes, is_leaf=lambda x: isinstance(x, tuple))


def shard_params(config: ModelConfig, params, mesh: Mesh, rules=LOGICAL_RULES):
  """Places existing params on the mesh (host arrays: every process passes the same ones)."""
  return jax.tree.map(distributed.put, params, param_shardings(config, mesh, rules))


def cast(array: jax.Array, dtype) -> jax.Array:
  """`array` in `dtype` where it lies (its sharding kept): each device casts its own shard."""
  if array.dtype == jax.numpy.dtype(dtype):
    return array
  return jax.jit(lambda x: x.astype(dtype), out_shardings=array.sharding)(array)


def cast_params(params, dtype):
  """Every weight in `dtype`, cast leaf by leaf where it lies: at most one leaf exists in both
  dtypes at a time, never the model."""
  return jax.tree.map(lambda leaf: cast(leaf, dtype), params)
