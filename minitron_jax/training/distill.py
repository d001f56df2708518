"""Retraining by knowledge distillation (Minitron §4): the jitted train and eval steps.

Only the student (and the student->teacher hidden projection) is trained; the teacher is an input
of the step, never part of the train state, never in the optimiser, never checkpointed. One
jitted step runs both forward passes, the loss terms LossConfig chose (loss_terms.py: the fused
logit KLD, the projected hidden-state losses, a mixture-of-experts student's router
load-balancing loss, ...) and an AdamW update, with gradient accumulation over micro-batches
inside the step. The resumable loop around it is loop.py.

With `skip_non_finite` a step whose loss or gradient norm is not finite leaves the state
untouched (the loop decides whether to go on).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from minitron_jax.models import model
from minitron_jax.objectives import losses
from minitron_jax.models.config import ModelConfig
from minitron_jax.errors import ConfigError
from minitron_jax.training import loss_terms
from minitron_jax.objectives.losses import LossConfig

Batch = dict[str, jax.Array]  # tokens, segment_ids, positions: [B,T] int32
# Metrics whose non-finite value means the step must not be applied.
GUARDED_METRICS = ("loss", "grad_norm")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW with linear warmup and cosine decay; the paper decays 2e-4 -> 4.5e-7."""

  peak_lr: float = 2e-4
  end_lr: float = 4.5e-7
  warmup_steps: int = 100
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  clip_norm: float = 1.0
  accumulation_steps: int = 1

  def __post_init__(self):
    if not (math.isfinite(self.peak_lr) and self.peak_lr > 0 and math.isfinite(self.end_lr)
            and self.end_lr >= 0):
      raise ConfigError(f"learning rates peak_lr={self.peak_lr}, end_lr={self.end_lr} must be "
                        "positive")
    if not isinstance(self.accumulation_steps, int) or self.accumulation_steps < 1:
      raise ConfigError(f"accumulation_steps={self.accumulation_steps} must be at least 1")
    if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
      raise ConfigError(f"warmup_steps={self.warmup_steps!r} must be a non-negative integer")
    if not self.clip_norm > 0:
      raise ConfigError(f"clip_norm={self.clip_norm!r} must be positive")

  def make(self, total_steps: int) -> optax.GradientTransformation:
    warmup = min(self.warmup_steps, max(total_steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, self.peak_lr, warmup, max(total_steps, warmup + 1), self.end_lr)
    return optax.chain(optax.clip_by_global_norm(self.clip_norm),
                       optax.adamw(schedule, self.b1, self.b2, weight_decay=self.weight_decay))


def _replicate_unplaced(tree):
  """Replicates leaves that sit on one device (step counters, the projection) over the mesh the
  params live on, so a checkpoint restores every leaf onto the same devices."""
  meshes = [leaf.sharding.mesh for leaf in jax.tree.leaves(tree)
            if isinstance(getattr(leaf, "sharding", None), jax.sharding.NamedSharding)]
  if not meshes:
    return tree
  replicated = jax.sharding.NamedSharding(meshes[0], jax.sharding.PartitionSpec())
  return jax.tree.map(
      lambda leaf: leaf if isinstance(leaf.sharding, jax.sharding.NamedSharding)
      else jax.device_put(leaf, replicated), tree)


def check_models(student_config: ModelConfig, teacher_config: ModelConfig | None,
                 loss_config: LossConfig, offline_teacher: bool = False) -> None:
  """Whether the loss can be computed between these two architectures (shapes only).

  offline_teacher: batches carry a stored teacher's top-k (teacher_logits_store.py) instead of the
  teacher running; only the forward-KL logit loss can be computed from it."""
  if offline_teacher:
    if loss_config.uses_hidden or loss_config.logit_loss != "forward_kl" or loss_config.top_k:
      raise ConfigError(f"a stored teacher gives logits only: logit_loss="
                        f"{loss_config.logit_loss!r}, top_k={loss_config.top_k}, hidden_loss="
                        f"{loss_config.hidden_loss!r}; allowed: forward_kl, top_k 0, hidden_loss "
                        "'none'")
    teacher_config = None
  elif loss_config.uses_teacher and teacher_config is None:
    raise ConfigError("the loss uses the teacher but no teacher was given")
  if loss_config.uses_router_aux and not student_config.is_moe:
    raise ConfigError(f"router_aux_loss_coef={loss_config.router_aux_loss_coef} needs a "
                      f"mixture-of-experts student; this one ({student_config.family}) is dense; "
                      "allowed: 0.0")
  if teacher_config is not None and teacher_config.vocab_size != student_config.vocab_size:
    raise ConfigError(f"teacher vocab_size={teacher_config.vocab_size} differs from student "
                      f"vocab_size={student_config.vocab_size}")
  if loss_config.uses_hidden:
    for pair in loss_config.hidden_pairs:
      for index, cfg in zip(pair, (teacher_config, student_config)):
        if not -(cfg.num_layers + 1) <= index <= cfg.num_layers:
          raise ConfigError(f"hidden pair index {index} is outside the "
                            f"{cfg.num_layers + 1} post-norm states")


class Distiller:
  """Static pieces of a distillation run: configs, optimiser, and the jitted functions.

  skip_non_finite: a step whose loss or gradient norm is not finite changes nothing (the loop
  may then go on, see LoopConfig.max_bad_steps). Off by default: selecting between the old and
  new state costs memory (a third of the params' size on CPU), and without it the loop stops at
  the first such step anyway.
  """

  def __init__(self, student_config: ModelConfig, teacher_config: ModelConfig | None,
               loss_config: LossConfig, optimizer_config: OptimizerConfig, total_steps: int,
               skip_non_finite: bool = False, offline_teacher: bool = False):
    check_models(student_config, teacher_config, loss_config, offline_teacher)
    self.offline_teacher = offline_teacher
    self.skip_non_finite = skip_non_finite
    self.student_config = student_config
    self.teacher_config = teacher_config
    self.loss_config = loss_config
    self.optimizer_config = optimizer_config
    self.total_steps = total_steps
    self.optimizer = optimizer_config.make(total_steps)
    self.terms = loss_terms.choose(loss_config, offline_teacher)
    self.train_step = jax.jit(self._train_step, donate_argnums=(0,))
    self.eval_step = jax.jit(self._eval_step)

  # --------------------------------------------------------------------------- state

  def init_state(self, student_params) -> dict[str, Any]:
    """The train state. It owns `student_params`: train_step donates their buffers."""
    trainable = {"student": student_params}
    if self.loss_config.uses_hidden:
      trainable["projection"] = jnp.eye(self.student_config.hidden_size,
                                        self.teacher_config.hidden_size, dtype=jnp.float32)
    state = {"step": jnp.zeros((), jnp.int32), "trainable": trainable,
             "opt_state": self.optimizer.init(trainable)}
    return _replicate_unplaced(state)

  # --------------------------------------------------------------------------- losses

  def _forward(self, config: ModelConfig, params, batch: Batch, keeps: tuple[str, ...]):
    """(final hidden [B,T,D], the per-layer intermediates `keeps` names, stacked over layers)."""
    def keep(inter):
      return {name: inter[loss_terms.INTERMEDIATES[name]] for name in keeps}

    hidden, kept = model.hidden_states(
        config, params, batch["tokens"], segment_ids=batch["segment_ids"],
        positions=batch["positions"], intermediates_fn=keep if keeps else None)
    return hidden, kept or {}

  def passes(self, trainable, teacher_params, batch: Batch) -> loss_terms.Passes:
    """One batch's forward passes: the student's, and the teacher's (no gradient) when a term
    reads it, each keeping what the terms need."""
    student = trainable["student"]
    student_hidden, student_kept = self._forward(
        self.student_config, student, batch,
        tuple(dict.fromkeys(k for term in self.terms for k in term.student_keeps())))
    passes = loss_terms.Passes(batch, self.student_config, student, student_hidden,
                               student_kept, projection=trainable.get("projection"))
    if any(term.runs_teacher for term in self.terms):
      keeps = tuple(dict.fromkeys(k for term in self.terms for k in term.teacher_keeps()))
      passes.teacher_config, passes.teacher = self.teacher_config, teacher_params
      passes.teacher_hidden, passes.teacher_kept = jax.lax.stop_gradient(
          self._forward(self.teacher_config, teacher_params, batch, keeps))
    return passes

  def loss_terms(self, trainable, teacher_params, batch: Batch, *, for_eval: bool = False):
    """(total loss, metrics) of one batch; for_eval also reports the student's cross-entropy."""
    passes = self.passes(trainable, teacher_params, batch)
    values = {term.name: term(passes) for term in self.terms}
    total, metrics = losses.combine(self.loss_config, **values)
    if for_eval:
      metrics["ce"] = values["ce"] if "ce" in values else (
          loss_terms.CrossEntropy(self.loss_config)(passes))
    return total, metrics

  # --------------------------------------------------------------------------- steps

  def _train_step(self, state, teacher_params, batch: Batch):
    accumulation = self.optimizer_config.accumulation_steps
    # Micro-batch i takes rows i, i + accumulation, ...: each device keeps its own rows (a
    # leading [accumulation, B/accumulation] split would move the batch sharding off B).
    micro = jax.tree.map(
        lambda x: x.reshape(-1, accumulation, *x.shape[1:]).swapaxes(0, 1), batch)
    grad_fn = jax.value_and_grad(self.loss_terms, has_aux=True)

    def accumulate(carry, micro_batch):
      grads_sum, metrics_sum = carry
      (_, metrics), grads = grad_fn(state["trainable"], teacher_params, micro_batch)
      return (jax.tree.map(jnp.add, grads_sum, grads),
              jax.tree.map(jnp.add, metrics_sum, metrics)), None

    zeros = jax.tree.map(jnp.zeros_like, state["trainable"])
    metric_shapes = jax.eval_shape(lambda: grad_fn(state["trainable"], teacher_params,
                                                   jax.tree.map(lambda x: x[0], micro))[0][1])
    metric_zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes)
    (grads, metrics), _ = jax.lax.scan(accumulate, (zeros, metric_zeros), micro)
    grads = jax.tree.map(lambda g: g / accumulation, grads)
    metrics = jax.tree.map(lambda m: m / accumulation, metrics)
    updates, opt_state = self.optimizer.update(grads, state["opt_state"], state["trainable"])
    trainable = optax.apply_updates(state["trainable"], updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    if self.skip_non_finite:  # the loop sees the same metrics and decides whether to go on
      finite = jnp.all(jnp.stack([jnp.isfinite(metrics[k]) for k in GUARDED_METRICS]))
      trainable, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                          (trainable, opt_state),
                                          (state["trainable"], state["opt_state"]))
    return {"step": state["step"] + 1, "trainable": trainable, "opt_state": opt_state}, metrics

  def _eval_step(self, trainable, teacher_params, batch: Batch):
    return self.loss_terms(trainable, teacher_params, batch, for_eval=True)[1]

  def evaluate(self, trainable, teacher_params, batches: list[Batch]) -> dict[str, float]:
    """Mean of every metric over fixed validation batches, plus perplexity of the student CE."""
    totals: dict[str, float] = {}
    for batch in batches:
      for name, value in self.eval_step(trainable, teacher_params, batch).items():
        totals[name] = totals.get(name, 0.0) + float(value)
    means = {f"val_{k}": v / max(len(batches), 1) for k, v in totals.items()}
    means["val_perplexity"] = math.exp(min(means["val_ce"], 50.0))
    return means
