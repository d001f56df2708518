"""Chunked KL distillation loss against a float64 numpy reference, the naive version and a budget.

The reference writes the loss and its analytic gradient out in numpy float64, so it shares no code
with either JAX implementation. The memory budget is checked from the compiled program only: the
[8192, 32768] problem is lowered with abstract inputs and never allocated or run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minitron_jax.errors import ConfigError
from minitron_jax.objectives.fused_kld import fused_kld, naive_kld


def _inputs(lead=(3, 7), ds=16, dt=24, vocab=50, seed=0):
  """float32 (student_hidden, student_head, teacher_hidden, teacher_head) with O(1) logits."""
  rng = np.random.RandomState(seed)
  return (rng.randn(*lead, ds).astype(np.float32),
          (rng.randn(ds, vocab) / np.sqrt(ds)).astype(np.float32),
          rng.randn(*lead, dt).astype(np.float32),
          (1.5 * rng.randn(dt, vocab) / np.sqrt(dt)).astype(np.float32))


def _log_softmax64(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _reference(hs, ws, ht, wt, temperature, mask):
  """float64: loss, d loss/d hs, d loss/d ws from the closed form (p_s - p_t) / tau per token."""
  hs, ws, ht, wt = (np.asarray(a, np.float64) for a in (hs, ws, ht, wt))
  lead = hs.shape[:-1]
  hs2, ht2 = hs.reshape(-1, hs.shape[-1]), ht.reshape(-1, ht.shape[-1])  # [N,Ds], [N,Dt]
  log_ps = _log_softmax64(hs2 @ ws / temperature)  # 'ND,DV->NV'
  log_pt = _log_softmax64(ht2 @ wt / temperature)
  counted = np.ones(hs2.shape[0]) if mask is None else np.asarray(mask, np.float64).reshape(-1)
  weights = counted / max(counted.sum(), 1.0)  # [N]
  loss = np.sum(weights * np.sum(np.exp(log_pt) * (log_pt - log_ps), -1))
  d_logits = (np.exp(log_ps) - np.exp(log_pt)) * (weights / temperature)[:, None]  # [N,V]
  return loss, (d_logits @ ws.T).reshape(*lead, -1), hs2.T @ d_logits  # 'NV,DV->ND', 'ND,NV->DV'


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)


def _mask(lead, seed=1):
  mask = np.random.RandomState(seed).rand(*lead) > 0.3
  mask.reshape(-1)[0] = False  # at least one token off, whatever the draw
  return mask


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("case", ["masked_bt", "unmasked_flat", "chunk_over_n"])
def test_matches_float64_reference(temperature, case):
  lead, chunk_size = {"masked_bt": ((3, 7), 8), "unmasked_flat": ((21,), 5),
                      "chunk_over_n": ((2, 5), 64)}[case]
  hs, ws, ht, wt = _inputs(lead)
  mask = _mask(lead) if case == "masked_bt" else None
  loss_fn = lambda hs, ws: fused_kld(hs, ws, ht, wt, temperature=temperature, mask=mask,
                                     chunk_size=chunk_size)
  loss, (d_hs, d_ws) = jax.value_and_grad(loss_fn, argnums=(0, 1))(hs, ws)
  ref_loss, ref_d_hs, ref_d_ws = _reference(hs, ws, ht, wt, temperature, mask)
  assert loss.dtype == jnp.float32 and loss.shape == ()
  assert d_hs.shape == hs.shape and d_hs.dtype == jnp.float32
  assert d_ws.shape == ws.shape and d_ws.dtype == jnp.float32
  assert ref_loss > 1e-2  # the distributions really differ, so the relative check means something
  assert _rel(loss, ref_loss) < 1e-5
  assert _rel(d_hs, ref_d_hs) < 1e-5
  assert _rel(d_ws, ref_d_ws) < 1e-5
  if mask is not None:  # uncounted tokens get exactly zero gradient
    assert np.all(np.asarray(d_hs)[~mask] == 0)
  naive = naive_kld(hs, ws, ht, wt, temperature=temperature, mask=mask)
  assert _rel(naive, ref_loss) < 1e-5


def test_bfloat16_inputs():
  hs, ws, ht, wt = _inputs((4, 9), ds=32, dt=32, vocab=96)
  mask = _mask((4, 9))
  grad_fn = jax.value_and_grad(
      lambda hs, ws, ht, wt: fused_kld(hs, ws, ht, wt, mask=mask, chunk_size=16), argnums=(0, 1))
  loss32, (d_hs32, d_ws32) = grad_fn(hs, ws, ht, wt)
  loss16, (d_hs16, d_ws16) = grad_fn(*(jnp.asarray(a, jnp.bfloat16) for a in (hs, ws, ht, wt)))
  assert loss16.dtype == jnp.float32 and np.isfinite(float(loss16))
  assert abs(float(loss16) - float(loss32)) < 5e-2 * float(loss32)
  assert d_hs16.dtype == jnp.bfloat16 and d_ws16.dtype == jnp.bfloat16
  for low, high in ((d_hs16, d_hs32), (d_ws16, d_ws32)):
    assert np.all(np.isfinite(np.asarray(low, np.float32)))
    assert _rel(np.asarray(low, np.float32), high) < 1e-1


@pytest.mark.parametrize("fn", [fused_kld, naive_kld])
def test_all_masked_is_zero_without_nan(fn):
  hs, ws, ht, wt = _inputs((2, 6))
  mask = np.zeros((2, 6), bool)
  loss, (d_hs, d_ws) = jax.value_and_grad(
      lambda hs, ws: fn(hs, ws, ht, wt, mask=mask, chunk_size=4), argnums=(0, 1))(hs, ws)
  assert float(loss) == 0.0
  assert np.all(np.asarray(d_hs) == 0) and np.all(np.asarray(d_ws) == 0)


def test_temp_memory_is_an_eighth_of_naive():
  tokens, vocab, dim = 8192, 32768, 256
  abstract = [jax.ShapeDtypeStruct(shape, jnp.float32)
              for shape in ((tokens, dim), (dim, vocab), (tokens, dim), (dim, vocab))]
  temp = {}
  for fn in (fused_kld, naive_kld):
    compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(*abstract).compile()
    stats = compiled.memory_analysis()
    assert stats is not None, "memory_analysis() is unavailable on this backend"
    temp[fn.__name__] = stats.temp_size_in_bytes
  logits_bytes = tokens * vocab * 4
  assert temp["naive_kld"] >= logits_bytes  # the baseline does hold [N, V] logits
  assert temp["fused_kld"] * 8 <= temp["naive_kld"], temp
  assert temp["fused_kld"] < logits_bytes // 2, temp  # never a full [N, V] buffer


@pytest.mark.parametrize("kwargs,message", [
    (dict(chunk_size=0), r"chunk_size=0 is invalid; allowed: an integer >= 1"),
    (dict(chunk_size=2.5), r"chunk_size=2.5 is invalid"),
    (dict(temperature=0.0), r"temperature=0.0 is invalid; allowed: a number > 0"),
    (dict(temperature=-1.0), r"temperature=-1.0 is invalid"),
    (dict(temperature=float("nan")), r"temperature=nan is invalid"),
])
@pytest.mark.parametrize("fn", [fused_kld, naive_kld])
def test_bad_options_raise(fn, kwargs, message):
  with pytest.raises(ConfigError, match=message):
    fn(*_inputs(), **kwargs)


def test_bad_shapes_raise():
  hs, ws, ht, wt = _inputs((3, 7), ds=16, dt=24, vocab=50)
  cases = [
      ((hs, ws[:8], ht, wt), {}, r"student_hidden shape \(3, 7, 16\) does not match student_head "
                                 r"shape \(8, 50\)"),
      ((hs, ws, ht, wt[:, :40]), {}, r"vocab sizes differ"),
      ((hs, ws, ht[:, :5], wt), {}, r"teacher_hidden shape \(3, 5, 24\) has leading dims"),
      ((hs, ws[None], ht, wt), {},
       r"student_head shape \(1, 16, 50\) is invalid; allowed: \[D, V\]"),
      ((hs, ws, ht, wt), dict(mask=np.ones((21,), bool)),
       r"mask shape \(21,\) is invalid; allowed: \(3, 7\)"),
  ]
  for args, kwargs, message in cases:
    for fn in (fused_kld, naive_kld):
      with pytest.raises(ConfigError, match=message):
        fn(*args, **kwargs)
  assert issubclass(ConfigError, ValueError)


def test_jit_gradients_match_naive_and_teacher_is_constant():
  hs, ws, ht, wt = _inputs((2, 11), ds=12, dt=20, vocab=40, seed=3)
  mask = _mask((2, 11), seed=4)

  def scaled(fn):  # a cotangent other than 1 exercises the backward scaling
    return jax.jit(jax.grad(lambda *a: 2.5 * fn(*a, temperature=1.5, mask=mask, chunk_size=4),
                            argnums=(0, 1, 2, 3)))

  fused_grads = scaled(fused_kld)(hs, ws, ht, wt)
  naive_grads = scaled(naive_kld)(hs, ws, ht, wt)
  for fused, naive in zip(fused_grads[:2], naive_grads[:2]):
    assert _rel(fused, naive) < 1e-5
  for fused, naive in zip(fused_grads[2:], naive_grads[2:]):  # teacher cotangents
    assert np.all(np.asarray(fused) == 0) and np.all(np.asarray(naive) == 0)
  jitted = jax.jit(lambda *a: fused_kld(*a, temperature=1.5, mask=mask, chunk_size=4))
  assert _rel(jitted(hs, ws, ht, wt), naive_kld(hs, ws, ht, wt, temperature=1.5, mask=mask)) < 1e-5


def test_soft_capped_logits_match_naive_values_and_gradients():
  """Gemma 2 caps its final logits: the fused chain rule through cap * tanh(z / cap) equals
  autodiff through the naive one, and the caps do change the loss."""
  hs, ws, ht, wt = _inputs((2, 11), ds=12, dt=20, vocab=40, seed=5)
  hs, ht = 3 * hs, 3 * ht  # logits of several units, so caps of 1.5 and 2 bend them
  mask = _mask((2, 11), seed=6)
  caps = dict(student_softcap=1.5, teacher_softcap=2.0)

  def value_and_grads(fn, **kw):
    return jax.jit(jax.value_and_grad(
        lambda *a: fn(*a, temperature=1.5, mask=mask, chunk_size=4, **kw),
        argnums=(0, 1)))(hs, ws, ht, wt)

  fused, fused_grads = value_and_grads(fused_kld, **caps)
  naive, naive_grads = value_and_grads(naive_kld, **caps)
  assert _rel(fused, naive) < 1e-5
  for f, n in zip(fused_grads, naive_grads):
    assert _rel(f, n) < 1e-5
  assert _rel(value_and_grads(fused_kld)[0], naive) > 1e-2
