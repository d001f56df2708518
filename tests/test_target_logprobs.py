"""Per-token target log-probabilities and argmax hits from hidden states, chunked and split over
the vocabulary on a mesh, against a float64 log-softmax of the whole logits."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding

from minitron_jax.models import partitioning
from minitron_jax.objectives.target_logprobs import target_logprobs

B, T, D, VOCAB = 8, 6, 16, 64
MESHES = {
    "data8": dict(data=8),
    "fsdp8": dict(data=1, fsdp=8),
    "tensor8": dict(data=1, tensor=8),
    "data2_fsdp2_tensor2": dict(data=2, fsdp=2, tensor=2),
}


def _inputs():
  rng = np.random.RandomState(0)
  hidden = rng.randn(B, T, D).astype(np.float32)
  head = (rng.randn(D, VOCAB) / np.sqrt(D)).astype(np.float32)
  # Columns 40 and 9 equal column 5: every token's logits tie there, and on 8 devices the three
  # lie in different vocabulary slices. Make them the argmax for half the rows.
  head[:, 9] = head[:, 40] = head[:, 5]
  hidden[: B // 2] += 40.0 * head[:, 5] / np.linalg.norm(head[:, 5]) ** 2  # logit 5 += 40
  targets = rng.randint(0, VOCAB, (B, T))
  targets[0, :3] = (5, 9, 40)  # a tie: only the first index counts as the argmax
  return hidden, head, targets


def _reference(hidden, head, targets, cap):
  logits = np.einsum("btd,dv->btv", hidden.astype(np.float64), head.astype(np.float64))
  if cap is not None:
    logits = cap * np.tanh(logits / cap)
  shifted = logits - logits.max(-1, keepdims=True)
  logprobs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  picked = np.take_along_axis(logprobs, targets[..., None], -1)[..., 0]
  return picked, np.argmax(logits, -1) == targets


@pytest.mark.parametrize("cap", [None, 30.0])
@pytest.mark.parametrize("mesh_name", [None, *sorted(MESHES)])
def test_target_logprobs_equal_a_float64_log_softmax(mesh_name, cap):
  hidden, head, targets = _inputs()
  want_logprobs, want_greedy = _reference(hidden, head, targets, cap)
  assert want_greedy[0, 0] and not want_greedy[0, 1:3].any()  # the tie case is built
  fn = jax.jit(lambda h, w, t: target_logprobs(h, w, t, chunk_size=5, softcap=cap))
  if mesh_name is None:
    got_logprobs, got_greedy = fn(hidden, head, targets)
  else:
    mesh = partitioning.make_mesh(partitioning.MeshConfig(**MESHES[mesh_name]))
    with jax.set_mesh(mesh):
      place = lambda x, axes: jax.device_put(  # noqa: E731
          x, NamedSharding(mesh, partitioning.logical_to_spec(axes, x.shape, mesh)))
      args = (place(hidden, ("batch", "length", "embed")), place(head, ("embed", "vocab")),
              place(targets, ("batch", "length")))
      got_logprobs, got_greedy = fn(*args)
      if mesh_name == "fsdp8":  # no device gathers the whole [D, V] head
        hlo = fn.lower(*args).compile().as_text()
        assert not [line for line in hlo.splitlines()
                    if "all-gather" in line and f"f32[{D},{VOCAB}]" in line]
  np.testing.assert_allclose(np.asarray(got_logprobs), want_logprobs, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(got_greedy), want_greedy)
