"""Distillation losses (Minitron §4): logit losses, LM cross-entropy, projected hidden-state losses.

Total loss L = w_ce * L_CLM + w_logits * L_logits + alpha * L_is (+ c_aux * L_aux for a mixture
of experts), where alpha is either a constant or, by default, w_is * stop_gradient(L_logits / L_is)
so the two terms keep equal scale, and L_aux is the student router's load-balancing loss.
p = softmax(logits / temperature) for every logit loss; no temperature² factor is applied.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax

from minitron_jax.errors import ConfigError

LOGIT_LOSSES = ("forward_kl", "reverse_kl", "mse", "cosine", "none")
HIDDEN_LOSSES = ("none", "cosine", "mse")


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Which terms make up the training loss and how they are weighted.

  hidden_pairs: (teacher_state, student_state) indices into each model's post-norm states, where
  state i < num_layers is the normalised input of layer i and -1 (or num_layers) the final norm
  output; negative indices count from the end, so ((-2, -2), (-1, -1)) is "last-2 : last-2".
  """

  logit_loss: str = "forward_kl"
  temperature: float = 1.0
  top_k: int = 0  # 0: the full vocabulary; K > 0: the teacher's top-K logits, renormalised
  logit_weight: float = 1.0
  ce_weight: float = 0.0
  hidden_loss: str = "none"
  hidden_pairs: tuple[tuple[int, int], ...] = ((-1, -1),)
  embedding_term: bool = False  # also match the embedding outputs through the projection
  hidden_weight: float = 1.0
  dynamic_alpha: bool = True
  fused: bool = True  # chunked logit KLD that never holds [tokens x vocab] of both models
  chunk_size: int = 1024
  # Weight of a mixture-of-experts student's load-balancing loss (moe.load_balancing_loss, as
  # transformers' router_aux_loss_coef); 0 leaves routing to the distillation terms alone, as
  # transformers does by default (output_router_logits=False).
  router_aux_loss_coef: float = 0.0

  def __post_init__(self):
    if self.logit_loss not in LOGIT_LOSSES:
      raise ConfigError(f"logit_loss={self.logit_loss!r} is not supported; allowed: "
                        f"{LOGIT_LOSSES}")
    if self.hidden_loss not in HIDDEN_LOSSES:
      raise ConfigError(f"hidden_loss={self.hidden_loss!r} is not supported; allowed: "
                        f"{HIDDEN_LOSSES}")
    if self.temperature <= 0:
      raise ConfigError(f"temperature={self.temperature} must be positive")
    if self.top_k < 0:
      raise ConfigError(f"top_k={self.top_k} must be 0 (full vocabulary) or positive")
    if min(self.logit_weight, self.ce_weight, self.hidden_weight) < 0:
      raise ConfigError("loss weights must be non-negative")
    coef = self.router_aux_loss_coef
    if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not 0 <= coef < math.inf:
      raise ConfigError(f"router_aux_loss_coef={coef!r} is invalid; allowed: a finite number >= 0 "
                        "(0: off)")
    if not self.uses_teacher and self.ce_weight == 0:
      raise ConfigError("every loss weight is zero; set ce_weight, logit_weight or hidden_loss")

  @property
  def uses_logits(self) -> bool:
    return self.logit_loss != "none" and self.logit_weight > 0

  @property
  def uses_hidden(self) -> bool:
    return self.hidden_loss != "none"

  @property
  def uses_router_aux(self) -> bool:
    return self.router_aux_loss_coef > 0

  @property
  def uses_teacher(self) -> bool:
    return self.uses_logits or self.uses_hidden

  @property
  def fused_logits(self) -> bool:
    return self.fused and self.logit_loss == "forward_kl" and self.top_k == 0

  @classmethod
  def cross_entropy_only(cls) -> "LossConfig":
    """Conventional training: next-token cross-entropy, no teacher."""
    return cls(logit_loss="none", logit_weight=0.0, ce_weight=1.0)


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  weights = mask.astype(jnp.float32)
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def next_token_mask(segment_ids: jax.Array) -> jax.Array:
  """[B,T-1]: position t predicts t+1 only inside one (non-padding) segment."""
  return (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] != 0)


def cross_entropy(logits: jax.Array, tokens: jax.Array, segment_ids: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy of [B,T,V] logits for [B,T] tokens."""
  losses = optax.softmax_cross_entropy_with_integer_labels(
      logits[:, :-1].astype(jnp.float32), tokens[:, 1:])
  return masked_mean(losses, next_token_mask(segment_ids))


def _restrict_to_top_k(teacher: jax.Array, student: jax.Array, k: int):
  """Both [...,V] logit tensors gathered at the teacher's top-k indices -> [...,k]."""
  top_teacher, indices = jax.lax.top_k(teacher, k)
  return top_teacher, jnp.take_along_axis(student, indices, axis=-1)


def logit_loss(student_logits: jax.Array, teacher_logits: jax.Array, mask: jax.Array,
               config: LossConfig) -> jax.Array:
  """Mean over unmasked tokens of Loss(p_teacher, p_student) from full [...,V] logits."""
  teacher = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32)) / config.temperature
  student = student_logits.astype(jnp.float32) / config.temperature
  if config.top_k:
    teacher, student = _restrict_to_top_k(teacher, student, config.top_k)
  log_pt, log_ps = jax.nn.log_softmax(teacher, -1), jax.nn.log_softmax(student, -1)
  pt, ps = jnp.exp(log_pt), jnp.exp(log_ps)
  if config.logit_loss == "forward_kl":
    per_token = jnp.sum(pt * (log_pt - log_ps), -1)
  elif config.logit_loss == "reverse_kl":
    per_token = jnp.sum(ps * (log_ps - log_pt), -1)
  elif config.logit_loss == "mse":
    per_token = jnp.sum(jnp.square(pt - ps), -1)
  else:
    per_token = 1.0 - optax.cosine_similarity(pt, ps, epsilon=1e-12)
  return masked_mean(per_token, mask)


def hidden_state_loss(teacher_states: list[jax.Array], student_states: list[jax.Array],
                      projection: jax.Array, mask: jax.Array, kind: str) -> jax.Array:
  """(1/l) Σ_k Loss(h_t^k, h_s^k W) over l state pairs; W [Ds,Dt] maps student to teacher width."""
  terms = []
  for teacher, student in zip(teacher_states, student_states):
    teacher = jax.lax.stop_gradient(teacher.astype(jnp.float32))
    projected = jnp.einsum("BTS,SD->BTD", student.astype(jnp.float32),
                           projection.astype(jnp.float32))
    if kind == "cosine":
      per_token = 1.0 - optax.cosine_similarity(projected, teacher, epsilon=1e-12)
    else:
      per_token = jnp.mean(jnp.square(projected - teacher), -1)
    terms.append(masked_mean(per_token, mask))
  return sum(terms) / len(terms)


def combine(config: LossConfig, *, ce=None, logits=None, hidden=None,
            router_aux=None) -> tuple[jax.Array, dict]:
  """The weighted total and a dict of every term (alpha included) for logging."""
  total = jnp.float32(0.0)
  metrics = {}
  if ce is not None:
    metrics["ce"] = ce
    total = total + config.ce_weight * ce
  if logits is not None:
    metrics["logit_loss"] = logits
    total = total + config.logit_weight * logits
  if hidden is not None:
    if config.dynamic_alpha and logits is not None:
      alpha = config.hidden_weight * jax.lax.stop_gradient(logits / jnp.maximum(hidden, 1e-12))
    else:
      alpha = jnp.float32(config.hidden_weight)
    metrics.update(hidden_loss=hidden, alpha=alpha)
    total = total + alpha * hidden
  if router_aux is not None:
    metrics["router_aux"] = router_aux
    total = total + config.router_aux_loss_coef * router_aux
  metrics["loss"] = total
  return total, metrics
