"""Device mesh and the one table that maps logical axes to mesh axes: a leaf that imports no model
code, so the model, the losses and the expert dispatch read the rules without import cycles.

Parallelism is a config change: every weight names its axes (see `model.logical_axes`), and
`LOGICAL_RULES` decides where each name lives. Pruning changes head and neuron counts, so a rule
is dropped for a dimension the mesh axis does not divide (that dimension is then replicated)
instead of failing.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from minitron_jax.errors import ConfigError

# expert: expert parallelism; a mixture's experts are split over it, and so is the batch, so the
# dense parts of the model stay data-parallel across it.
MESH_AXES = ("data", "fsdp", "tensor", "expert")

# logical axis -> mesh axes it is split over (tried in order; each mesh axis used once per array).
LOGICAL_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("layers", ()),
    ("vocab", ("tensor",)),
    ("embed", ("fsdp",)),
    ("q_heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("head_dim", ()),
    ("mlp", ("tensor",)),
    ("experts", ("expert",)),
    ("moe_mlp", ("tensor",)),
    ("shared_mlp", ("tensor",)),
    # Mamba-2 (mamba2.py): heads split like attention heads; a head's channels, the groups'
    # B and C (small, read by every head of a group) and the conv taps stay whole.
    ("mamba_heads", ("tensor",)),
    ("mamba_head_dim", ()),
    ("mamba_groups", ()),
    ("mamba_state", ()),
    ("mamba_conv", ()),
    ("unit", ()),
    ("length", ()),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh shape; one entry may be -1 to take every remaining device."""

  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  expert: int = 1

  def shape(self, num_devices: int) -> tuple[int, int, int, int]:
    sizes = [self.data, self.fsdp, self.tensor, self.expert]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
      raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))} is invalid; allowed: positive sizes "
                        "and at most one -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
      if num_devices % known:
        raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))} does not divide {num_devices} "
                          "devices")
      sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
      raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices; "
                        f"{num_devices} are available")
    return tuple(sizes)


def make_mesh(mesh_config: MeshConfig = MeshConfig(), devices: Sequence | None = None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_config.shape(len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def logical_to_spec(axes: Sequence[str], shape: Sequence[int], mesh: Mesh,
                    rules=LOGICAL_RULES) -> PartitionSpec:
  """The PartitionSpec for one array; mesh axes that do not divide a dimension are skipped."""
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name, size in zip(axes, shape):
    if name not in table:
      raise ConfigError(f"logical axis {name!r} has no sharding rule; known: {sorted(table)}")
    chosen = []
    for mesh_axis in table[name]:
      split = math.prod(mesh.shape[a] for a in chosen) * mesh.shape[mesh_axis]
      if mesh_axis not in used and size % split == 0:
        chosen.append(mesh_axis)
    used.update(chosen)
    spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
  return PartitionSpec(*spec)


def batch_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
  """Leading (batch) axis over data x fsdp x expert as far as they divide it, the rest
  replicated."""
  axes = ("batch",) + ("length",) * (len(shape) - 1)
  return NamedSharding(mesh, logical_to_spec(axes, shape, mesh))

