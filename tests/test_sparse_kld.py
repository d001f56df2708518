"""The stored-teacher loss: top-k + tail forward KL, fused, against the dense KLD and a float64
reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minitron_jax.objectives import fused_kld, sparse_kld
from minitron_jax.errors import ConfigError

N_BATCH, N_SEQ, D_STUDENT, D_TEACHER, VOCAB = 2, 7, 12, 16, 40


def _inputs(seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  hs = jax.random.normal(keys[0], (N_BATCH, N_SEQ, D_STUDENT))
  ws = jax.random.normal(keys[1], (D_STUDENT, VOCAB)) / 2
  ht = jax.random.normal(keys[2], (N_BATCH, N_SEQ, D_TEACHER))
  wt = jax.random.normal(keys[3], (D_TEACHER, VOCAB)) / 2
  mask = np.ones((N_BATCH, N_SEQ), bool)
  mask[1, 5:] = False
  return hs, ws, ht, wt, jnp.asarray(mask)


@pytest.mark.parametrize("temperature,cap", [(1.0, None), (2.0, None), (1.0, 3.0)])
def test_full_vocabulary_equals_the_dense_kld_values_and_gradients(temperature, cap):
  hs, ws, ht, wt, mask = _inputs()
  teacher = sparse_kld.teacher_top_k(jnp.einsum("btd,dv->btv", ht, wt), VOCAB, temperature)
  assert np.all(np.isneginf(teacher[2]))  # nothing outside the top-V

  def sparse(hs, ws):
    return sparse_kld.sparse_kld(hs, ws, *teacher, temperature=temperature, mask=mask,
                                 chunk_size=5, student_softcap=cap)

  def dense(hs, ws):
    return fused_kld.naive_kld(hs, ws, ht, wt, temperature=temperature, mask=mask,
                               student_softcap=cap)

  value, grads = jax.value_and_grad(sparse, argnums=(0, 1))(hs, ws)
  expected, expected_grads = jax.value_and_grad(dense, argnums=(0, 1))(hs, ws)
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  for got, want in zip(grads, expected_grads):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def _float64_reference(hs, ws, ht, wt, mask, k, temperature):
  z_t = np.einsum("btd,dv->btv", np.asarray(ht, np.float64), np.asarray(wt, np.float64))
  z_s = np.einsum("btd,dv->btv", np.asarray(hs, np.float64), np.asarray(ws, np.float64))
  log_softmax = lambda z: z - np.log(np.sum(np.exp(z - z.max(-1, keepdims=True)), -1,
                                            keepdims=True)) - z.max(-1, keepdims=True)
  log_p, log_q = log_softmax(z_t / temperature), log_softmax(z_s / temperature)
  top = np.argsort(-log_p, axis=-1)[..., :k]
  p_k, q_k = np.take_along_axis(np.exp(log_p), top, -1), np.take_along_axis(np.exp(log_q), top, -1)
  p_tail, q_tail = 1 - p_k.sum(-1), 1 - q_k.sum(-1)
  kl = np.sum(p_k * (np.log(p_k) - np.log(q_k)), -1) + p_tail * (np.log(p_tail) - np.log(q_tail))
  counted = np.asarray(mask, np.float64)
  return np.sum(kl * counted) / counted.sum()


@pytest.mark.parametrize("k", [1, 5, 32])
def test_top_k_loss_matches_float64_and_its_gradients_the_unfused_reference(k):
  hs, ws, ht, wt, mask = _inputs(1)
  teacher = sparse_kld.teacher_top_k(jnp.einsum("btd,dv->btv", ht, wt), k, 1.5)
  np.testing.assert_allclose(  # the k + 1 outcomes hold all the teacher's mass
      np.exp(np.asarray(teacher[0], np.float64)).sum(-1) + np.exp(np.asarray(teacher[2])), 1.0,
      rtol=1e-5)

  def fused(hs, ws):
    return sparse_kld.sparse_kld(hs, ws, *teacher, temperature=1.5, mask=mask, chunk_size=4)

  def naive(hs, ws):
    return sparse_kld.naive_sparse_kld(hs, ws, *teacher, temperature=1.5, mask=mask)

  value, grads = jax.value_and_grad(fused, argnums=(0, 1))(hs, ws)
  np.testing.assert_allclose(value, _float64_reference(hs, ws, ht, wt, mask, k, 1.5), rtol=1e-4)
  expected, expected_grads = jax.value_and_grad(naive, argnums=(0, 1))(hs, ws)
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  for got, want in zip(grads, expected_grads):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_stored_in_bfloat16_the_loss_moves_by_rounding_only():
  hs, ws, ht, wt, mask = _inputs(2)
  log_probs, indices, tail = sparse_kld.teacher_top_k(jnp.einsum("btd,dv->btv", ht, wt), 8)
  exact = sparse_kld.sparse_kld(hs, ws, log_probs, indices, tail, mask=mask)
  rounded = sparse_kld.sparse_kld(hs, ws, log_probs.astype(jnp.bfloat16), indices,
                                  tail.astype(jnp.bfloat16), mask=mask)
  np.testing.assert_allclose(rounded, exact, rtol=2e-2)


def test_bad_shapes_are_one_line_errors():
  hs, ws, ht, wt, _ = _inputs()
  log_probs, indices, tail = sparse_kld.teacher_top_k(jnp.einsum("btd,dv->btv", ht, wt), 4)
  with pytest.raises(ConfigError, match="do not match the tokens"):
    sparse_kld.sparse_kld(hs, ws, log_probs[:, :3], indices[:, :3], tail)
  with pytest.raises(ConfigError, match="chunk_size=0"):
    sparse_kld.sparse_kld(hs, ws, log_probs, indices, tail, chunk_size=0)


@pytest.mark.parametrize("k,cap,chunk", [(8, None, 3), (VOCAB, None, 5), (4, 3.0, 64)])
def test_the_top_k_of_hidden_states_equals_that_of_the_whole_logits(k, cap, chunk):
  _, _, ht, wt, _ = _inputs()
  logits = jnp.einsum("btd,dv->btv", ht, wt, preferred_element_type=jnp.float32)
  if cap is not None:
    logits = cap * jnp.tanh(logits / cap)
  want = sparse_kld.teacher_top_k(logits, k, 1.3)
  got = jax.jit(lambda h, w: sparse_kld.teacher_top_k_of_hidden(
      h, w, k, 1.3, chunk_size=chunk, cap=cap))(ht, wt)  # 14 tokens: a ragged last chunk
  np.testing.assert_array_equal(got[1], want[1])
  for got_part, want_part in ((got[0], want[0]), (got[2], want[2])):
    np.testing.assert_allclose(got_part, want_part, rtol=1e-6, atol=1e-6)


def test_the_top_k_of_hidden_states_never_holds_the_whole_logits():
  tokens, width, vocab, chunk = 4096, 32, 4096, 128
  hidden = jax.ShapeDtypeStruct((tokens, width), jnp.float32)
  head = jax.ShapeDtypeStruct((width, vocab), jnp.float32)
  whole = jax.jit(lambda h, w: sparse_kld.teacher_top_k(h @ w, 16)).lower(hidden, head)
  chunked = jax.jit(lambda h, w: sparse_kld.teacher_top_k_of_hidden(
      h, w, 16, chunk_size=chunk)).lower(hidden, head)
  temp = {name: lowered.compile().memory_analysis().temp_size_in_bytes
          for name, lowered in (("whole", whole), ("chunked", chunked))}
  logits_bytes = tokens * vocab * 4  # 64 MiB
  assert temp["whole"] >= logits_bytes
  assert temp["chunked"] < logits_bytes / 8, temp  # a few chunks' [128, V], not [tokens, V]
