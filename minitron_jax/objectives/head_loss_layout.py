"""How a chunked LM-head loss splits over the mesh in context: tokens over the batch axes, the
vocabulary over the axis the head's vocabulary is split over, both read from the one table of
logical-axis rules (partitioning.LOGICAL_RULES), so the loss runs where the activations already are.

Where no axis splits the vocabulary (pure data parallelism or FSDP), that layout gives every device
the whole [D, V] head: for Llama-3's vocabulary and D = 2048, 1 GiB of float32 per device.
Evaluation, whose batches are small, can ask for the other split instead (`vocabulary_first`): the
vocabulary over the mesh axes the tokens would take, every token's hidden state on every device,
so each device holds 1/n of the head and makes its slice of every token's logits.
"""

from __future__ import annotations

import dataclasses
import math

import jax
from jax.sharding import AbstractMesh, PartitionSpec as P

from minitron_jax.models import partitioning


@dataclasses.dataclass(frozen=True)
class Layout:
  """mesh: the abstract mesh in context; token_spec: the spec of the token dims [...];
  token_axes: the mesh axes splitting them; vocab_axis: the axis (or axes, major first) splitting
  the vocabulary (None: every device holds all of it)."""

  mesh: AbstractMesh
  token_spec: P
  token_axes: tuple[str, ...]
  vocab_axis: str | tuple[str, ...] | None

  @property
  def head(self) -> P:
    """A [D, V] head (or any [..., V] array): the vocabulary split, D whole (gathered from FSDP
    as every weight is for its matmul)."""
    return P(None, self.vocab_axis)

  def rows(self, ndim: int) -> P:
    """A per-token array [..., *rest] of `ndim` dims: token dims split, the rest whole."""
    return P(*self.token_spec, *([None] * (ndim - len(self.token_spec))))

  def sum_over_tokens(self, x: jax.Array) -> jax.Array:
    """Adds up every device's partial sum over its own tokens (inside shard_map)."""
    return jax.lax.psum(x, self.token_axes) if self.token_axes else x


def _axes(entry, mesh) -> tuple[str, ...]:
  """The mesh axes of one PartitionSpec entry that split anything (size > 1)."""
  if entry is None:
    return ()
  return tuple(a for a in ((entry,) if isinstance(entry, str) else entry) if mesh.shape[a] > 1)


def choose(lead: tuple[int, ...], vocab_size: int, *, vocabulary_first: bool = False
           ) -> Layout | None:
  """The layout for tokens of shape `lead` and a vocabulary of `vocab_size` on the mesh set with
  `jax.set_mesh`; None without a mesh, on one device, or when nothing would be split (then the
  loss runs as one program wherever GSPMD puts it). `vocabulary_first`: where the rules split
  the tokens but not the vocabulary, split the vocabulary over the tokens' axes instead and keep
  every token on every device, when that is the smaller copy (fewer tokens than vocabulary
  entries: [N, D] hidden states against the [D, V] head) and the vocabulary divides evenly."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1 or mesh.manual_axes:
    return None
  token_spec = partitioning.logical_to_spec(("batch",) + ("length",) * (len(lead) - 1), lead, mesh)
  token_axes = tuple(a for entry in token_spec for a in _axes(entry, mesh))
  vocab_axes = _axes(partitioning.logical_to_spec(("vocab",), (vocab_size,), mesh)[0], mesh)
  if len(vocab_axes) > 1:
    raise NotImplementedError(f"the vocabulary split over several mesh axes {vocab_axes}")
  vocab_axis = vocab_axes[0] if vocab_axes else None
  if not token_axes and vocab_axis is None:
    return None
  if (vocabulary_first and vocab_axis is None and math.prod(lead) < vocab_size
      and vocab_size % math.prod(mesh.shape[a] for a in token_axes) == 0):
    return Layout(mesh, P(*([None] * len(lead))), (), token_axes)
  return Layout(mesh, token_spec, token_axes, vocab_axis)
