"""Retraining by knowledge distillation (Minitron §4): the jitted train step and the resumable loop.

Only the student (and the student->teacher hidden projection) is trained; the teacher is an input
of the step, never part of the train state, never in the optimiser, never checkpointed. One
jitted step runs both forward passes, the fused logit KLD, the projected hidden-state losses and
an AdamW update, with gradient accumulation over micro-batches inside the step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from typing import Any, Callable, Iterator

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from minitron_jax import losses, model
from minitron_jax.config import ConfigError, ModelConfig
from minitron_jax.losses import LossConfig

Batch = dict[str, jax.Array]  # tokens, segment_ids, positions: [B,T] int32


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
    if self.peak_lr <= 0 or self.end_lr < 0:
      raise ConfigError(f"learning rates peak_lr={self.peak_lr}, end_lr={self.end_lr} must be "
                        "positive")
    if self.accumulation_steps < 1:
      raise ConfigError(f"accumulation_steps={self.accumulation_steps} must be at least 1")

  def make(self, total_steps: int) -> optax.GradientTransformation:
    warmup = min(self.warmup_steps, max(total_steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, self.peak_lr, warmup, max(total_steps, warmup + 1), self.end_lr)
    return optax.chain(optax.clip_by_global_norm(self.clip_norm),
                       optax.adamw(schedule, self.b1, self.b2, weight_decay=self.weight_decay))


def _state_list(config: ModelConfig, stacked_norms, final_hidden) -> list[jax.Array]:
  """Post-norm states: the normalised input of every layer, then the final norm output."""
  return [stacked_norms[i] for i in range(config.num_layers)] + [final_hidden]


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


class Distiller:
  """Static pieces of a distillation run: configs, optimiser, and the jitted functions."""

  def __init__(self, student_config: ModelConfig, teacher_config: ModelConfig | None,
               loss_config: LossConfig, optimizer_config: OptimizerConfig, total_steps: int):
    if loss_config.uses_teacher and teacher_config is None:
      raise ConfigError("the loss uses the teacher but no teacher was given")
    if teacher_config is not None and teacher_config.vocab_size != student_config.vocab_size:
      raise ConfigError(f"teacher vocab_size={teacher_config.vocab_size} differs from student "
                        f"vocab_size={student_config.vocab_size}")
    self.student_config = student_config
    self.teacher_config = teacher_config
    self.loss_config = loss_config
    self.optimizer_config = optimizer_config
    self.total_steps = total_steps
    self.optimizer = optimizer_config.make(total_steps)
    if loss_config.uses_hidden:
      for pair in loss_config.hidden_pairs:
        for index, cfg in zip(pair, (teacher_config, student_config)):
          if not -(cfg.num_layers + 1) <= index <= cfg.num_layers:
            raise ConfigError(f"hidden pair index {index} is outside the "
                              f"{cfg.num_layers + 1} post-norm states")
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

  def _forward(self, config: ModelConfig, params, batch: Batch):
    cfg = self.loss_config

    def keep(inter):
      kept = {"norms": inter["attn_norm"]}
      if cfg.embedding_term:
        kept["inputs"] = inter["layer_input"]
      return kept

    return model.hidden_states(config, params, batch["tokens"], segment_ids=batch["segment_ids"],
                               positions=batch["positions"],
                               intermediates_fn=keep if cfg.uses_hidden else None)

  def loss_terms(self, trainable, teacher_params, batch: Batch, *, for_eval: bool = False):
    """(total loss, metrics) of one batch."""
    cfg = self.loss_config
    student = trainable["student"]
    mask = batch["segment_ids"] != 0
    s_hidden, s_inter = self._forward(self.student_config, student, batch)
    need_full_student_logits = (cfg.ce_weight > 0 or for_eval
                                or (cfg.uses_logits and not cfg.fused_logits))
    s_logits = (model.logits_from_hidden(self.student_config, student, s_hidden)
                if need_full_student_logits else None)
    terms = {}
    if cfg.ce_weight > 0 or for_eval:
      terms["ce"] = losses.cross_entropy(s_logits, batch["tokens"], batch["segment_ids"])
    if cfg.uses_teacher:
      t_hidden, t_inter = jax.lax.stop_gradient(
          self._forward(self.teacher_config, teacher_params, batch))
      if cfg.uses_logits:
        if cfg.fused_logits:
          terms["logits"] = losses.fused_kld(
              s_hidden, model.lm_head_kernel(self.student_config, student), t_hidden,
              model.lm_head_kernel(self.teacher_config, teacher_params),
              temperature=cfg.temperature, mask=mask, chunk_size=cfg.chunk_size)
        else:
          t_logits = model.logits_from_hidden(self.teacher_config, teacher_params, t_hidden)
          terms["logits"] = losses.logit_loss(s_logits, t_logits, mask, cfg)
      if cfg.uses_hidden:
        t_states = _state_list(self.teacher_config, t_inter["norms"], t_hidden)
        s_states = _state_list(self.student_config, s_inter["norms"], s_hidden)
        teacher_side = [t_states[t] for t, _ in cfg.hidden_pairs]
        student_side = [s_states[s] for _, s in cfg.hidden_pairs]
        if cfg.embedding_term:
          teacher_side.append(t_inter["inputs"][0])
          student_side.append(s_inter["inputs"][0])
        terms["hidden"] = losses.hidden_state_loss(teacher_side, student_side,
                                                   trainable["projection"], mask, cfg.hidden_loss)
    total, metrics = losses.combine(
        cfg, ce=terms.get("ce") if cfg.ce_weight > 0 else None,
        logits=terms.get("logits"), hidden=terms.get("hidden"))
    if for_eval:
      metrics["ce"] = terms["ce"]
    return total, metrics

  # --------------------------------------------------------------------------- steps

  def _train_step(self, state, teacher_params, batch: Batch):
    accumulation = self.optimizer_config.accumulation_steps
    micro = jax.tree.map(lambda x: x.reshape(accumulation, -1, *x.shape[1:]), batch)
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


# ----------------------------------------------------------------------------- the loop


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  steps: int
  log_every: int = 10
  eval_every: int = 100
  eval_steps: tuple[int, ...] = ()  # extra steps to evaluate at (the search ranks at these)
  checkpoint_every: int = 100
  keep_checkpoints: int = 2


class MetricsLog:
  """Console progress line, metrics.jsonl and TensorBoard event files in one place."""

  def __init__(self, directory: pathlib.Path, resume_step: int, log: Callable[[str], None]):
    from tensorboardX import SummaryWriter  # only the trainer needs it

    directory.mkdir(parents=True, exist_ok=True)
    self.path = directory / "metrics.jsonl"
    # Drop records past the checkpoint we resume from: they will be produced again.
    if self.path.exists():
      kept = [line for line in self.path.read_text().splitlines()
              if line and json.loads(line)["step"] <= resume_step]
      self.path.write_text("".join(line + "\n" for line in kept))
    self.writer = SummaryWriter(str(directory / "tensorboard"))
    self.log = log

  def write(self, step: int, metrics: dict[str, float], total_steps: int, seconds: float):
    record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for name, value in metrics.items():
      self.writer.add_scalar(name, float(value), step)
    self.writer.flush()
    shown = " ".join(f"{k} {float(v):.4f}" for k, v in metrics.items())
    self.log(f"[distill] step {step}/{total_steps} {shown} ({seconds:.0f}s)")

  def close(self):
    self.writer.close()


def _to_device(batch, batch_sharding) -> Batch:
  arrays = {k: np.asarray(batch[k], np.int32) for k in ("tokens", "segment_ids", "positions")}
  if batch_sharding is None:
    return {k: jnp.asarray(v) for k, v in arrays.items()}
  return {k: jax.device_put(v, batch_sharding(v.shape)) for k, v in arrays.items()}


def train(distiller: Distiller, student_params, teacher_params, train_iterator: Iterator,
          validation_batches: list, loop: LoopConfig, workdir: str | pathlib.Path, *,
          batch_sharding=None, log: Callable[[str], None] = print):
  """Runs (or resumes) the loop; returns (trained student params, final validation metrics).

  train_iterator: a grain DatasetIterator of batch dicts; its position is checkpointed with the
  train state, so a killed run restarts exactly where the last checkpoint left it.
  """
  workdir = pathlib.Path(workdir).absolute()
  options = ocp.CheckpointManagerOptions(max_to_keep=loop.keep_checkpoints,
                                         save_interval_steps=loop.checkpoint_every,
                                         enable_async_checkpointing=False)
  validation = [_to_device(b, batch_sharding) for b in validation_batches]
  with ocp.CheckpointManager(workdir / "checkpoints", options=options) as manager:
    state = distiller.init_state(student_params)
    start = manager.latest_step()
    if start is not None:
      abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
      restored = manager.restore(start, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract),
          data=grain.checkpoint.CheckpointRestore(train_iterator)))
      state = restored["state"]
      log(f"[distill] resumed from step {start}")
    start = start or 0
    metrics_log = MetricsLog(workdir, start, log)
    started = time.perf_counter()
    final = {}
    for step in range(start + 1, loop.steps + 1):
      batch = _to_device(next(train_iterator), batch_sharding)
      state, metrics = distiller.train_step(state, teacher_params, batch)
      record = {}
      if step % loop.log_every == 0 or step == loop.steps:
        record.update(jax.device_get(metrics))
      if step % loop.eval_every == 0 or step == loop.steps or step in loop.eval_steps:
        final = distiller.evaluate(state["trainable"], teacher_params, validation)
        record.update(final)
      if record:
        metrics_log.write(step, record, loop.steps, time.perf_counter() - started)
      manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=grain.checkpoint.CheckpointSave(train_iterator)),
          force=step == loop.steps)
    manager.wait_until_finished()
    metrics_log.close()
    if not final:  # resumed after the last step: evaluate what was restored
      final = distiller.evaluate(state["trainable"], teacher_params, validation)
  return state["trainable"]["student"], final
