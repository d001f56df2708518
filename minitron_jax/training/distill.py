"""Retraining by knowledge distillation (Minitron §4): the jitted train step and the resumable loop.

Only the student (and the student->teacher hidden projection) is trained; the teacher is an input
of the step, never part of the train state, never in the optimiser, never checkpointed. One
jitted step runs both forward passes, the fused logit KLD, the projected hidden-state losses, a
mixture-of-experts student's router load-balancing loss (when weighted) and an AdamW update, with
gradient accumulation over micro-batches inside the step.

The loop never passes on garbage: a step whose loss or gradient norm is not finite stops
training with `Diverged` before its state can be checkpointed. With `skip_non_finite` such a step
leaves the state untouched instead, and the loop tolerates `LoopConfig.max_bad_steps` of them.
SIGTERM saves a checkpoint at the next step boundary and raises `preemption.Preempted`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from minitron_jax.checkpoints import orbax_arrays
from minitron_jax.core import atomic, distributed, optional, preemption
from minitron_jax.models import model, moe
from minitron_jax.objectives import losses, sparse_kld
from minitron_jax.models.config import ModelConfig
from minitron_jax.errors import ConfigError
from minitron_jax.objectives.losses import LossConfig

Batch = dict[str, jax.Array]  # tokens, segment_ids, positions: [B,T] int32
# Metrics whose non-finite value means the step must not be applied.
GUARDED_METRICS = ("loss", "grad_norm")


class Diverged(RuntimeError):
  """The loss or gradient norm stopped being finite; training stopped before saving the bad
  state. The message names the run, the step and the last checkpoint saved before it."""


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

  def _forward(self, config: ModelConfig, params, batch: Batch, *, router: bool = False):
    """(final hidden, per-layer kept intermediates or None); `router` also keeps every layer's
    router_logits [L,B,T,E] (the student's, for the load-balancing loss)."""
    cfg = self.loss_config
    hidden = cfg.uses_hidden

    def keep(inter):
      kept = {}
      if hidden:
        kept["norms"] = inter["attn_norm"]
        if cfg.embedding_term:
          kept["inputs"] = inter["layer_input"]
      if router:
        kept["router_logits"] = inter["router_logits"]
      return kept

    return model.hidden_states(config, params, batch["tokens"], segment_ids=batch["segment_ids"],
                               positions=batch["positions"],
                               intermediates_fn=keep if hidden or router else None)

  def loss_terms(self, trainable, teacher_params, batch: Batch, *, for_eval: bool = False):
    """(total loss, metrics) of one batch."""
    cfg = self.loss_config
    student = trainable["student"]
    mask = batch["segment_ids"] != 0
    s_hidden, s_inter = self._forward(self.student_config, student, batch,
                                      router=cfg.uses_router_aux)
    need_full_student_logits = (cfg.ce_weight > 0 or for_eval
                                or (cfg.uses_logits and not cfg.fused_logits))
    s_logits = (model.logits_from_hidden(self.student_config, student, s_hidden)
                if need_full_student_logits else None)
    terms = {}
    if cfg.ce_weight > 0 or for_eval:
      terms["ce"] = losses.cross_entropy(s_logits, batch["tokens"], batch["segment_ids"])
    if cfg.uses_teacher and self.offline_teacher:
      terms["logits"] = sparse_kld.sparse_kld(
          s_hidden, model.lm_head_kernel(self.student_config, student),
          batch["teacher_log_probs"], batch["teacher_indices"], batch["teacher_tail"],
          temperature=cfg.temperature, mask=mask, chunk_size=cfg.chunk_size,
          student_softcap=self.student_config.final_logit_softcap)
    elif cfg.uses_teacher:
      t_hidden, t_inter = jax.lax.stop_gradient(
          self._forward(self.teacher_config, teacher_params, batch))
      if cfg.uses_logits:
        if cfg.fused_logits:
          terms["logits"] = losses.fused_kld(
              s_hidden, model.lm_head_kernel(self.student_config, student), t_hidden,
              model.lm_head_kernel(self.teacher_config, teacher_params),
              temperature=cfg.temperature, mask=mask, chunk_size=cfg.chunk_size,
              student_softcap=self.student_config.final_logit_softcap,
              teacher_softcap=self.teacher_config.final_logit_softcap)
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
    if cfg.uses_router_aux:
      terms["router_aux"] = moe.load_balancing_loss(
          s_inter["router_logits"], self.student_config.num_experts_per_tok, mask)
    total, metrics = losses.combine(
        cfg, ce=terms.get("ce") if cfg.ce_weight > 0 else None,
        logits=terms.get("logits"), hidden=terms.get("hidden"),
        router_aux=terms.get("router_aux"))
    if for_eval:
      metrics["ce"] = terms["ce"]
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


# ----------------------------------------------------------------------------- the loop


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  steps: int
  log_every: int = 10
  eval_every: int = 100
  eval_steps: tuple[int, ...] = ()  # extra steps to evaluate at (the search ranks at these)
  checkpoint_every: int = 100
  keep_checkpoints: int = 2
  # Steps with a non-finite loss or gradient norm that are skipped (not applied) before the run
  # stops with Diverged; 0: the first one stops it. Counted per process. Needs a Distiller with
  # skip_non_finite.
  max_bad_steps: int = 0

  def __post_init__(self):
    for name in ("steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name}={value!r} must be a positive integer")
    if not isinstance(self.max_bad_steps, int) or self.max_bad_steps < 0:
      raise ConfigError(f"max_bad_steps={self.max_bad_steps!r} must be a non-negative integer")
    outside = [s for s in self.eval_steps if not 1 <= s <= self.steps]
    if outside:
      raise ConfigError(f"eval steps {outside} are outside the run's steps 1..{self.steps}")


class MetricsLog:
  """Console progress line, metrics.jsonl and TensorBoard event files in one place."""

  def __init__(self, directory: pathlib.Path, resume_step: int, log: Callable[[str], None],
               label: str = "distill"):
    from tensorboardX import SummaryWriter  # only the trainer needs it

    directory.mkdir(parents=True, exist_ok=True)
    self.path = directory / "metrics.jsonl"
    # Drop records past the checkpoint we resume from: they will be produced again. So is a line
    # a kill cut short (only the last line can be, and it is past the checkpoint).
    if self.path.exists():
      kept = []
      for line in self.path.read_text().splitlines():
        try:
          step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
          continue
        if step <= resume_step:
          kept.append(line)
      atomic.write_text(self.path, "".join(line + "\n" for line in kept))
    # One process writes the logs: every process sees the same metrics.
    self.writer = SummaryWriter(str(directory / "tensorboard")) if distributed.is_primary() else None
    self.log = log
    self.label = label

  def write(self, step: int, metrics: dict[str, float], total_steps: int, seconds: float):
    if not distributed.is_primary():
      return
    record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for name, value in metrics.items():
      self.writer.add_scalar(name, float(value), step)
    self.writer.flush()
    shown = " ".join(f"{k} {float(v):.4f}" for k, v in metrics.items())
    self.log(f"[{self.label}] step {step}/{total_steps} {shown} ({seconds:.0f}s)")

  def close(self):
    if self.writer is not None:
      self.writer.close()


# A stored teacher's top-k ride along with the tokens (teacher_logits_store.py), kept in their dtypes.
_TEACHER_KEYS = ("teacher_log_probs", "teacher_indices", "teacher_tail")


def _to_device(batch, batch_sharding) -> Batch:
  arrays = {k: np.asarray(batch[k], np.int32) for k in ("tokens", "segment_ids", "positions")}
  arrays.update({k: np.asarray(batch[k]) for k in _TEACHER_KEYS if k in batch})
  if batch_sharding is None:
    return {k: jnp.asarray(v) for k, v in arrays.items()}
  return {k: distributed.put(v, batch_sharding(v.shape)) for k, v in arrays.items()}


class _Guard:
  """Decides, step by step, whether training may go on after non-finite metrics."""

  def __init__(self, label: str, max_bad_steps: int, checkpoints: pathlib.Path, manager,
               log: Callable[[str], None]):
    self.label, self.max_bad_steps, self.log = label, max_bad_steps, log
    self.checkpoints, self.manager = checkpoints, manager
    self.skipped: list[int] = []

  def _last_good(self) -> str:
    # Every saved step was checked before it was saved, and a skipped step changed nothing.
    # Steps after a bad one are never saved: with skip_non_finite off, the state is bad from it.
    saved = self.manager.all_steps()
    if not saved:
      return "no checkpoint was saved before it"
    return f"last good checkpoint {self.checkpoints / str(max(saved))} (step {max(saved)})"

  def check_step(self, step: int, metrics) -> None:
    values = {k: float(metrics[k]) for k in GUARDED_METRICS}
    if all(math.isfinite(v) for v in values.values()):
      return
    shown = ", ".join(f"{k} {v}" for k, v in values.items())
    self.skipped.append(step)
    if len(self.skipped) > self.max_bad_steps:
      raise Diverged(f"[{self.label}] diverged at step {step} ({shown}); {self._last_good()}; "
                     "lower the learning rate or raise clip_norm")
    self.log(f"[{self.label}] step {step}: {shown}; update skipped ({len(self.skipped)} of "
             f"max_bad_steps={self.max_bad_steps})")

  def check_validation(self, step: int, metrics: dict[str, float]) -> None:
    bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
    if bad:  # the state itself is bad: no tolerance
      raise Diverged(f"[{self.label}] diverged at step {step} (validation {bad}); "
                     f"{self._last_good()}; lower the learning rate or raise clip_norm")


def _grain():
  # Only the loop checkpoints a data iterator: the step and the losses need no data pipeline.
  return optional.module("grain", "checkpointing the training data's position (distill.train)")


def _restore(manager, step: int, state, train_iterator, directory: pathlib.Path):
  grain = _grain()
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  try:
    return manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract),
        data=grain.checkpoint.CheckpointRestore(train_iterator)))["state"]
  except Exception as e:  # orbax, tensorstore and grain raise bare Exceptions for damaged files
    first = (str(e).splitlines() or [type(e).__name__])[0][:200]
    raise ConfigError(f"checkpoint {directory / str(step)} cannot be restored ({first}); it is "
                      "damaged or from another model: delete it to resume from the one before "
                      "(or delete the checkpoints directory to start over)") from None


def train(distiller: Distiller, student_params, teacher_params, train_iterator: Iterator,
          validation_batches: list, loop: LoopConfig, workdir: str | pathlib.Path, *,
          batch_sharding=None, log: Callable[[str], None] = print, label: str = "distill"):
  """Runs (or resumes) the loop; returns (trained student params, final validation metrics).

  train_iterator: a grain DatasetIterator of batch dicts; its position is checkpointed with the
  train state, so a killed run restarts exactly where the last checkpoint left it.
  label names the run in log lines and errors. Raises Diverged (see the module docstring) and,
  after SIGTERM, preemption.Preempted once the step in progress is checkpointed. The final
  metrics include `skipped_steps`, the non-finite steps this process skipped.
  """
  if loop.max_bad_steps and not distiller.skip_non_finite:
    raise ConfigError(f"max_bad_steps={loop.max_bad_steps} needs a Distiller with "
                      "skip_non_finite=True, or a skipped step would still change the weights")
  grain = _grain()
  workdir = pathlib.Path(workdir).absolute()
  checkpoints = workdir / "checkpoints"
  options = ocp.CheckpointManagerOptions(max_to_keep=loop.keep_checkpoints,
                                         save_interval_steps=loop.checkpoint_every,
                                         enable_async_checkpointing=False)
  validation = [_to_device(b, batch_sharding) for b in validation_batches]
  orbax_arrays.configure()
  with ocp.CheckpointManager(checkpoints, options=options) as manager, preemption.watch():
    state = distiller.init_state(student_params)
    start = manager.latest_step()
    if start is not None:
      state = _restore(manager, start, state, train_iterator, checkpoints)
      log(f"[{label}] resumed from step {start}")
    start = start or 0
    metrics_log = MetricsLog(workdir, start, log, label)
    guard = _Guard(label, loop.max_bad_steps, checkpoints, manager, log)
    started = time.perf_counter()
    final = {}
    unchecked = None  # (step, metrics) not looked at yet
    try:
      for step in range(start + 1, loop.steps + 1):
        batch = _to_device(next(train_iterator), batch_sharding)
        state, metrics = distiller.train_step(state, teacher_params, batch)
        # The previous step has finished (or nearly) by now, so checking it costs no wait while
        # this one runs; a step that is logged, evaluated or saved is checked at once instead.
        if unchecked is not None:
          guard.check_step(*unchecked)
        stop = preemption.requested_anywhere()
        logged = step % loop.log_every == 0 or step == loop.steps
        evaluated = step % loop.eval_every == 0 or step == loop.steps or step in loop.eval_steps
        saved = stop or step == loop.steps or manager.should_save(step)
        unchecked = (step, metrics)
        if logged or evaluated or saved:
          guard.check_step(*unchecked)
          unchecked = None
        record = {}
        if logged:
          record.update(jax.device_get(metrics))
        if evaluated:
          final = distiller.evaluate(state["trainable"], teacher_params, validation)
          guard.check_validation(step, final)
          record.update(final)
        if record:
          metrics_log.write(step, record, loop.steps, time.perf_counter() - started)
        manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(train_iterator)), force=saved)
        if stop:
          manager.wait_until_finished()
          raise preemption.Preempted(
              f"[{label}] stopped by SIGTERM after step {step}/{loop.steps}; checkpoint saved "
              f"in {checkpoints / str(step)}; run the same command again to resume")
      manager.wait_until_finished()
    finally:
      metrics_log.close()
    if not final:  # resumed after the last step: evaluate what was restored
      final = distiller.evaluate(state["trainable"], teacher_params, validation)
      guard.check_validation(loop.steps, final)
  final["skipped_steps"] = len(guard.skipped)
  return state["trainable"]["student"], final
