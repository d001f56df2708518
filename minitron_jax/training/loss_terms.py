"""The terms of the distillation loss as small strategies, chosen once from a LossConfig.

Each term names the key `losses.combine` weighs it under, what the forward passes must keep for
it (per-layer intermediates of the student or teacher; whether the teacher runs at all) and how
it is computed from one batch's `Passes`. `choose` picks the terms a configuration trains on:

  ce          next-token cross-entropy of the student            CrossEntropy
  logits      the logit KLD: fused over vocabulary chunks,        FusedLogitKLD
              on the full logits (reverse KL, top-k, ...),        FullLogitLoss
              or against a stored teacher's top-k                 StoredTopKKLD
  hidden      projected hidden-state distance                     HiddenStates
  router_aux  a mixture-of-experts student's load balancing       RouterLoadBalance
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import jax

from minitron_jax.models import model, moe
from minitron_jax.models.config import ModelConfig
from minitron_jax.objectives import fused_kld, losses, sparse_kld
from minitron_jax.objectives.losses import LossConfig

Batch = dict[str, jax.Array]  # tokens, segment_ids, positions: [B,T] int32 (+ a stored teacher's)

# What a term may ask the forward pass to keep -> the decoder's intermediate it is.
INTERMEDIATES = {"norms": "attn_norm",  # [L,B,T,D] each layer's normalised input
                 "inputs": "layer_input",  # [L,B,T,D] each layer's input (0: the embeddings)
                 "router_logits": "router_logits"}  # [L,B,T,E]


@dataclasses.dataclass
class Passes:
  """One batch's forward passes, shared by every term: the student's always, the teacher's when
  a term reads it (teacher_hidden None otherwise). Full logits are computed on first use."""

  batch: Batch
  student_config: ModelConfig
  student: Any
  student_hidden: jax.Array  # [B,T,D] after the final norm
  student_kept: dict[str, jax.Array]
  teacher_config: ModelConfig | None = None
  teacher: Any = None
  teacher_hidden: jax.Array | None = None
  teacher_kept: dict[str, jax.Array] = dataclasses.field(default_factory=dict)
  projection: jax.Array | None = None  # [D_student, D_teacher], trained

  @property
  def mask(self) -> jax.Array:
    return self.batch["segment_ids"] != 0

  @functools.cached_property
  def student_logits(self) -> jax.Array:  # [B,T,V] float32
    return model.logits_from_hidden(self.student_config, self.student, self.student_hidden)

  @functools.cached_property
  def teacher_logits(self) -> jax.Array:
    return model.logits_from_hidden(self.teacher_config, self.teacher, self.teacher_hidden)


@dataclasses.dataclass(frozen=True)
class Term:
  """A term of the loss: `name` is its key in `losses.combine`."""

  cfg: LossConfig
  name: ClassVar[str]
  runs_teacher: ClassVar[bool] = False

  def student_keeps(self) -> tuple[str, ...]:
    return ()

  def teacher_keeps(self) -> tuple[str, ...]:
    return ()

  def __call__(self, passes: Passes) -> jax.Array:
    raise NotImplementedError


class CrossEntropy(Term):
  name = "ce"

  def __call__(self, passes: Passes) -> jax.Array:
    batch = passes.batch
    return losses.cross_entropy(passes.student_logits, batch["tokens"], batch["segment_ids"])


class FusedLogitKLD(Term):
  """Forward KL over vocabulary chunks: never [tokens x vocab] of both models at once."""

  name = "logits"
  runs_teacher = True

  def __call__(self, passes: Passes) -> jax.Array:
    student, teacher = passes.student_config, passes.teacher_config
    return fused_kld.fused_kld(
        passes.student_hidden, model.lm_head_kernel(student, passes.student),
        passes.teacher_hidden, model.lm_head_kernel(teacher, passes.teacher),
        temperature=self.cfg.temperature, mask=passes.mask, chunk_size=self.cfg.chunk_size,
        student_softcap=student.final_logit_softcap, teacher_softcap=teacher.final_logit_softcap)


class FullLogitLoss(Term):
  """Any `logit_loss` (reverse KL, JS, top-k, ...) on both models' full logits."""

  name = "logits"
  runs_teacher = True

  def __call__(self, passes: Passes) -> jax.Array:
    return losses.logit_loss(passes.student_logits, passes.teacher_logits, passes.mask, self.cfg)


class StoredTopKKLD(Term):
  """Forward KL against the top-k + tail a stored teacher wrote (the batch carries them)."""

  name = "logits"

  def __call__(self, passes: Passes) -> jax.Array:
    batch = passes.batch
    return sparse_kld.sparse_kld(
        passes.student_hidden, model.lm_head_kernel(passes.student_config, passes.student),
        batch["teacher_log_probs"], batch["teacher_indices"], batch["teacher_tail"],
        temperature=self.cfg.temperature, mask=passes.mask, chunk_size=self.cfg.chunk_size,
        student_softcap=passes.student_config.final_logit_softcap)


class HiddenStates(Term):
  """Distance between the paired post-norm states (and the embeddings, with embedding_term),
  the student's through the trained projection."""

  name = "hidden"
  runs_teacher = True

  def student_keeps(self) -> tuple[str, ...]:
    return ("norms", "inputs") if self.cfg.embedding_term else ("norms",)

  teacher_keeps = student_keeps

  def __call__(self, passes: Passes) -> jax.Array:
    teacher_states = _states(passes.teacher_config, passes.teacher_kept, passes.teacher_hidden)
    student_states = _states(passes.student_config, passes.student_kept, passes.student_hidden)
    teacher_side = [teacher_states[t] for t, _ in self.cfg.hidden_pairs]
    student_side = [student_states[s] for _, s in self.cfg.hidden_pairs]
    if self.cfg.embedding_term:
      teacher_side.append(passes.teacher_kept["inputs"][0])
      student_side.append(passes.student_kept["inputs"][0])
    return losses.hidden_state_loss(teacher_side, student_side, passes.projection, passes.mask,
                                    self.cfg.hidden_loss)


class RouterLoadBalance(Term):
  name = "router_aux"

  def student_keeps(self) -> tuple[str, ...]:
    return ("router_logits",)

  def __call__(self, passes: Passes) -> jax.Array:
    return moe.load_balancing_loss(passes.student_kept["router_logits"],
                                   passes.student_config.num_experts_per_tok, passes.mask)


def _states(config: ModelConfig, kept: dict[str, jax.Array], final_hidden) -> list[jax.Array]:
  """Post-norm states: the normalised input of every layer, then the final norm output."""
  return [kept["norms"][i] for i in range(config.num_layers)] + [final_hidden]


def logit_term(cfg: LossConfig, offline_teacher: bool) -> type[Term]:
  """The logit KLD's implementation: against stored top-k, fused, or on full logits."""
  if offline_teacher:
    return StoredTopKKLD
  return FusedLogitKLD if cfg.fused_logits else FullLogitLoss


def choose(cfg: LossConfig, offline_teacher: bool = False) -> tuple[Term, ...]:
  """The terms `cfg` trains on, in the order `losses.combine` adds them. A stored teacher gives
  logits only (distill.check_models refuses hidden-state terms with it)."""
  wanted = ((CrossEntropy, cfg.ce_weight > 0),
            (logit_term(cfg, offline_teacher), cfg.uses_logits),
            (HiddenStates, cfg.uses_hidden and not offline_teacher),
            (RouterLoadBalance, cfg.uses_router_aux))
  return tuple(term(cfg) for term, used in wanted if used)
