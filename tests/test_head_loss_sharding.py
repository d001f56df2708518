"""The chunked head losses on a mesh: each device walks its own tokens (and its vocabulary slice
under `tensor`), and the loss and gradients equal the one-device program's on every mesh.

Also checks the compiled programs: no all-gather of the hidden states (the [tokens, D] inputs)
on any mesh, which is what GSPMD did before the loss ran under shard_map.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from minitron_jax.models import partitioning
from minitron_jax.objectives import chunked_ce, head_loss_layout
from minitron_jax.objectives.fused_kld import fused_kld
from minitron_jax.objectives.sparse_kld import sparse_kld, teacher_top_k, teacher_top_k_of_hidden

B, T, DS, DT, VOCAB = 8, 12, 16, 24, 64
MESHES = {
    "data8": dict(data=8),
    "fsdp8": dict(data=1, fsdp=8),
    "tensor8": dict(data=1, tensor=8),
    "data4_tensor2": dict(data=4, tensor=2),
    "data2_fsdp2_tensor2": dict(data=2, fsdp=2, tensor=2),
    "data2_expert4": dict(data=2, expert=4),
}


def _inputs(seed=0):
  rng = np.random.RandomState(seed)
  hs = rng.randn(B, T, DS).astype(np.float32)
  ws = (rng.randn(DS, VOCAB) / np.sqrt(DS)).astype(np.float32)
  ht = rng.randn(B, T, DT).astype(np.float32)
  wt = (1.5 * rng.randn(DT, VOCAB) / np.sqrt(DT)).astype(np.float32)
  # Packed rows: two documents per row and trailing padding (segment 0), as batches carry them.
  segment_ids = np.ones((B, T), np.int32)
  segment_ids[:, T // 2:] = 2
  for row in range(B):
    segment_ids[row, T - row % 4:] = 0
  return hs, ws, ht, wt, segment_ids != 0


def _fused_loss(cap):
  def loss(hs, ws, ht, wt, mask):
    return fused_kld(hs, ws, ht, wt, temperature=1.7, mask=mask, chunk_size=5,
                     student_softcap=cap, teacher_softcap=cap)
  return loss


def _sparse_loss(k, cap):
  def loss(hs, ws, ht, wt, mask):
    log_probs, indices, tail = teacher_top_k(jnp.einsum("btd,dv->btv", ht, wt), k, 1.7)
    return sparse_kld(hs, ws, log_probs, indices, tail, temperature=1.7, mask=mask,
                      chunk_size=5, student_softcap=cap)
  return loss


def _ce_loss(cap):
  targets = np.random.RandomState(3).randint(0, VOCAB, (B, T))

  def loss(hs, ws, ht, wt, mask):
    del ht, wt
    return chunked_ce.cross_entropy(hs, ws, targets, mask, chunk_size=5, softcap=cap)
  return loss


LOSSES = {
    "ce_softcap": _ce_loss(3.0),
    "fused": _fused_loss(None),
    "fused_softcap": _fused_loss(3.0),
    "sparse_top8": _sparse_loss(8, None),
    "sparse_whole_vocab_softcap": _sparse_loss(VOCAB, 3.0),
}


def _place(mesh, hs, ws, ht, wt, mask):
  """As training places them: weights by their logical axes, batches over the batch axes."""
  head = NamedSharding(mesh, partitioning.logical_to_spec(("embed", "vocab"), ws.shape, mesh))
  rows = lambda x: partitioning.batch_sharding(mesh, x.shape)  # noqa: E731
  return (jax.device_put(hs, rows(hs)), jax.device_put(ws, head), jax.device_put(ht, rows(ht)),
          jax.device_put(wt, NamedSharding(mesh, P())), jax.device_put(mask, rows(mask)))


def _value_and_grads(loss, args, mesh=None):
  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  if mesh is None:
    return fn(*args)
  with jax.set_mesh(mesh):
    return fn(*_place(mesh, *args))


@pytest.mark.parametrize("loss_name", sorted(LOSSES))
@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_values_and_gradients_equal_one_device(loss_name, mesh_name):
  args = _inputs()
  loss = LOSSES[loss_name]
  value, (d_hs, d_ws) = _value_and_grads(loss, args)
  mesh = partitioning.make_mesh(partitioning.MeshConfig(**MESHES[mesh_name]))
  mesh_value, (mesh_d_hs, mesh_d_ws) = _value_and_grads(loss, args, mesh)
  np.testing.assert_allclose(mesh_value, value, rtol=2e-6)
  # Partial sums add in another order across devices: float32 round-off only.
  for got, want in ((mesh_d_hs, d_hs), (mesh_d_ws, d_ws)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5,
                               atol=1e-6 * float(np.max(np.abs(want))))


def _collectives(hlo: str) -> dict[str, list[str]]:
  """Collective op -> the result shapes of each in a compiled program's text."""
  found: dict[str, list[str]] = {}
  for match in re.finditer(r"= (\(?[^=]*?\)?) (all-gather|all-reduce|reduce-scatter|all-to-all|"
                           r"collective-permute)(?:-start)?\(", hlo):
    found.setdefault(match.group(2), []).append(match.group(1))
  return found


@pytest.mark.parametrize("mesh_name", ["data8", "fsdp8", "data4_tensor2"])
def test_no_device_gathers_the_hidden_states(mesh_name):
  hs, ws, ht, wt, mask = _inputs()
  mesh = partitioning.make_mesh(partitioning.MeshConfig(**MESHES[mesh_name]))
  fn = jax.jit(jax.value_and_grad(LOSSES["fused"], argnums=(0, 1)))
  with jax.set_mesh(mesh):
    hlo = fn.lower(*_place(mesh, hs, ws, ht, wt, mask)).compile().as_text()
  collectives = _collectives(hlo)
  # Only weights may be gathered (FSDP splits the head's D); GSPMD gathered every token's hidden
  # states and token weights onto every device, and moved them around with collective-permutes.
  weights = {f"f32[{a},{b}]" for a, b in (ws.shape, wt.shape)}
  gathered = [s for s in collectives.get("all-gather", []) if s.split("{")[0] not in weights]
  assert not gathered and "collective-permute" not in collectives, collectives


@pytest.mark.parametrize("k", [8, VOCAB])
@pytest.mark.parametrize("mesh_name", ["data8", "tensor8", "data4_tensor2", "data2_fsdp2_tensor2"])
def test_teacher_top_k_equals_one_device(mesh_name, k):
  _, _, ht, wt, _ = _inputs()
  logits = np.einsum("btd,dv->btv", ht, wt)
  fn = jax.jit(lambda z: teacher_top_k(z, k, 1.7))
  want = fn(logits)
  mesh = partitioning.make_mesh(partitioning.MeshConfig(**MESHES[mesh_name]))
  with jax.set_mesh(mesh):
    spec = partitioning.logical_to_spec(("batch", "length", "vocab"), logits.shape, mesh)
    got = fn(jax.device_put(logits, NamedSharding(mesh, spec)))
  np.testing.assert_array_equal(got[1], want[1])
  for got_part, want_part in ((got[0], want[0]), (got[2], want[2])):
    np.testing.assert_allclose(got_part, want_part, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cap", [None, 3.0])
def test_chunked_cross_entropy_equals_optax_values_and_gradients(cap):
  import optax

  hs, ws, _, _, mask = _inputs()
  targets = np.random.RandomState(3).randint(0, VOCAB, (B, T))

  def reference(hs, ws):
    logits = jnp.einsum("btd,dv->btv", hs, ws)
    logits = logits if cap is None else cap * jnp.tanh(logits / cap)
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(per_token * mask) / jnp.sum(mask)

  want = jax.value_and_grad(reference, argnums=(0, 1))(hs, ws)
  got = jax.value_and_grad(lambda hs, ws: chunked_ce.cross_entropy(
      hs, ws, targets, mask, chunk_size=7, softcap=cap), argnums=(0, 1))(hs, ws)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  for g, w in zip(got[1], want[1]):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mesh_name", ["data8", "tensor8", "data2_fsdp2_tensor2"])
def test_the_chunked_teacher_top_k_equals_one_device(mesh_name):
  _, _, ht, wt, _ = _inputs()
  fn = jax.jit(lambda h, w: teacher_top_k_of_hidden(h, w, 8, 1.7, chunk_size=5))
  want = fn(ht, wt)
  mesh = partitioning.make_mesh(partitioning.MeshConfig(**MESHES[mesh_name]))
  with jax.set_mesh(mesh):
    spec = partitioning.logical_to_spec(("batch", "length", "embed"), ht.shape, mesh)
    head = partitioning.logical_to_spec(("embed", "vocab"), wt.shape, mesh)
    got = fn(jax.device_put(ht, NamedSharding(mesh, spec)),
             jax.device_put(wt, NamedSharding(mesh, head)))
  np.testing.assert_array_equal(got[1], want[1])
  for got_part, want_part in ((got[0], want[0]), (got[2], want[2])):
    np.testing.assert_allclose(got_part, want_part, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mesh_name", ["data8", "fsdp8", "data2_fsdp2_tensor2", "data2_expert4"])
def test_vocabulary_first_cross_entropy_equals_one_device(mesh_name):
  # Fewer tokens (32) than vocabulary entries (64): evaluation's case, where the head is the
  # larger operand and each device takes a slice of the vocabulary instead of the tokens.
  hs, ws, _, _, mask = _inputs()
  hs, mask = hs[:, -4:], mask[:, -4:]  # the rows' ends, with their padding
  targets = np.random.RandomState(3).randint(0, VOCAB, (B, 4))

  def loss(hs, ws, mask):
    return chunked_ce.cross_entropy(hs, ws, targets, mask, chunk_size=5, softcap=3.0,
                                    vocabulary_first=True)

  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  want_value, want_grads = fn(hs, ws, mask)
  mesh = partitioning.make_mesh(partitioning.MeshConfig(**MESHES[mesh_name]))
  with jax.set_mesh(mesh):
    layout = head_loss_layout.choose(hs.shape[:-1], VOCAB, vocabulary_first=True)
    placed_hs, placed_ws, _, _, placed_mask = _place(mesh, hs, ws, hs, ws, mask)
    lowered = fn.lower(placed_hs, placed_ws, placed_mask)
    got_value, got_grads = fn(placed_hs, placed_ws, placed_mask)
  if "tensor" in mesh_name:  # the vocabulary is already split over tensor: the tokens split too
    assert layout.vocab_axis == "tensor" and layout.token_axes
  else:
    assert layout.token_axes == () and layout.vocab_axis, layout
    # No device gathers the whole [D, V] head: it is re-split from D to V, never made whole.
    gathers = _collectives(lowered.compile().as_text()).get("all-gather", [])
    assert not [s for s in gathers if s.startswith(f"f32[{DS},{VOCAB}]")], gathers
  np.testing.assert_allclose(got_value, want_value, rtol=2e-6)
  for got, want in zip(got_grads, want_grads):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5,
                               atol=1e-6 * float(np.max(np.abs(want))))
