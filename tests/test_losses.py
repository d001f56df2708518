"""Logit, hidden-state and combined losses against float64 numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minitron_jax.objectives import fused_kld, losses
from minitron_jax.errors import ConfigError
from minitron_jax.objectives.losses import LossConfig

RNG = np.random.RandomState(0)
STUDENT = RNG.randn(2, 5, 11).astype(np.float32) * 2
TEACHER = RNG.randn(2, 5, 11).astype(np.float32) * 2
MASK = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)


def _softmax64(x, temperature):
  x = np.asarray(x, np.float64) / temperature
  x = x - x.max(-1, keepdims=True)
  return np.exp(x) / np.exp(x).sum(-1, keepdims=True)


def _reference(kind, temperature, top_k=0):
  student, teacher = STUDENT.astype(np.float64), TEACHER.astype(np.float64)
  if top_k:
    index = np.argsort(-teacher, -1)[..., :top_k]
    teacher = np.take_along_axis(teacher, index, -1)
    student = np.take_along_axis(student, index, -1)
  pt, ps = _softmax64(teacher, temperature), _softmax64(student, temperature)
  per_token = {
      "forward_kl": (pt * (np.log(pt) - np.log(ps))).sum(-1),
      "reverse_kl": (ps * (np.log(ps) - np.log(pt))).sum(-1),
      "mse": ((pt - ps) ** 2).sum(-1),
      "cosine": 1 - (pt * ps).sum(-1) / np.linalg.norm(pt, axis=-1) / np.linalg.norm(ps, axis=-1),
  }[kind]
  return per_token[MASK].mean()


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "mse", "cosine"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("top_k", [0, 4])
def test_logit_losses_match_float64(kind, temperature, top_k):
  config = LossConfig(logit_loss=kind, temperature=temperature, top_k=top_k, fused=False)
  value = losses.logit_loss(jnp.asarray(STUDENT), jnp.asarray(TEACHER), jnp.asarray(MASK), config)
  np.testing.assert_allclose(value, _reference(kind, temperature, top_k), rtol=1e-5, atol=1e-7)


def test_logit_loss_gives_no_gradient_to_the_teacher():
  config = LossConfig(fused=False)
  grad = jax.grad(lambda t: losses.logit_loss(jnp.asarray(STUDENT), t, jnp.asarray(MASK), config))(
      jnp.asarray(TEACHER))
  np.testing.assert_array_equal(grad, 0)


def test_fused_forward_kl_equals_full_logit_kl():
  hidden_s, hidden_t = RNG.randn(2, 5, 6).astype(np.float32), RNG.randn(2, 5, 8).astype(np.float32)
  head_s, head_t = RNG.randn(6, 11).astype(np.float32), RNG.randn(8, 11).astype(np.float32)
  fused = fused_kld.fused_kld(hidden_s, head_s, hidden_t, head_t, temperature=2.0, mask=MASK,
                              chunk_size=3)
  full = losses.logit_loss(jnp.asarray(hidden_s @ head_s), jnp.asarray(hidden_t @ head_t),
                           jnp.asarray(MASK), LossConfig(temperature=2.0))
  np.testing.assert_allclose(fused, full, rtol=1e-5)


def test_cross_entropy_only_counts_pairs_inside_a_segment():
  tokens = jnp.asarray(RNG.randint(0, 11, (1, 5)))
  segment_ids = jnp.asarray([[1, 1, 2, 2, 0]])
  logits = jnp.asarray(STUDENT[:1])
  log_probs = np.log(_softmax64(STUDENT[:1], 1.0))
  # Pairs (0->1) in segment 1 and (2->3) in segment 2; (1->2) crosses, (3->4) hits padding.
  expected = -(log_probs[0, 0, tokens[0, 1]] + log_probs[0, 2, tokens[0, 3]]) / 2
  np.testing.assert_allclose(losses.cross_entropy(logits, tokens, segment_ids), expected,
                             rtol=1e-6)


@pytest.mark.parametrize("kind", ["cosine", "mse"])
def test_hidden_state_loss_matches_float64(kind):
  teacher = [RNG.randn(2, 5, 4).astype(np.float32) for _ in range(2)]
  student = [RNG.randn(2, 5, 3).astype(np.float32) for _ in range(2)]
  projection = RNG.randn(3, 4).astype(np.float32)
  value = losses.hidden_state_loss(teacher, student, jnp.asarray(projection), jnp.asarray(MASK),
                                   kind)
  terms = []
  for t, s in zip(teacher, student):
    p = s.astype(np.float64) @ projection
    t = t.astype(np.float64)
    if kind == "cosine":
      per_token = 1 - (p * t).sum(-1) / np.linalg.norm(p, axis=-1) / np.linalg.norm(t, axis=-1)
    else:
      per_token = ((p - t) ** 2).mean(-1)
    terms.append(per_token[MASK].mean())
  np.testing.assert_allclose(value, np.mean(terms), rtol=1e-5)


def test_dynamic_alpha_is_the_stopped_ratio():
  config = LossConfig(hidden_loss="cosine", hidden_weight=0.5)

  def total(logit_value, hidden_value):
    return losses.combine(config, logits=logit_value, hidden=hidden_value)[0]

  value, (d_logits, d_hidden) = jax.value_and_grad(total, argnums=(0, 1))(2.0, 4.0)
  alpha = 0.5 * 2.0 / 4.0
  assert value == pytest.approx(2.0 + alpha * 4.0)
  assert d_logits == pytest.approx(1.0)  # alpha's dependence on L_logits is stopped
  assert d_hidden == pytest.approx(alpha)
  constant = LossConfig(hidden_loss="cosine", hidden_weight=0.5, dynamic_alpha=False)
  assert losses.combine(constant, logits=2.0, hidden=4.0)[1]["alpha"] == pytest.approx(0.5)


@pytest.mark.parametrize("fields, message", [
    (dict(logit_loss="js"), "logit_loss='js' is not supported"),
    (dict(hidden_loss="l1"), "hidden_loss='l1' is not supported"),
    (dict(temperature=0.0), "temperature=0.0 must be positive"),
    (dict(top_k=-1), "top_k=-1 must be 0"),
    (dict(logit_loss="none", ce_weight=0.0), "every loss weight is zero"),
    (dict(router_aux_loss_coef=-0.1),
     r"router_aux_loss_coef=-0.1 is invalid; allowed: a finite number >= 0 \(0: off\)"),
    (dict(router_aux_loss_coef=float("nan")), "router_aux_loss_coef=nan is invalid"),
])
def test_bad_loss_config_is_a_one_line_error(fields, message):
  with pytest.raises(ConfigError, match=message):
    LossConfig(**fields)
