"""The resumable distillation loop around distill.Distiller's jitted step: batches in, metrics
logged (metrics.jsonl, TensorBoard), validation at fixed steps, orbax checkpoints of the train
state with the data iterator's position, preemption and divergence handling.

The loop never passes on garbage: a step whose loss or gradient norm is not finite stops
training with `Diverged` before its state can be checkpointed. With the Distiller's
`skip_non_finite` such a step leaves the state untouched instead, and the loop tolerates
`LoopConfig.max_bad_steps` of them. SIGTERM saves a checkpoint at the next step boundary and
raises `preemption.Preempted`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from minitron_jax.checkpoints import orbax_arrays
from minitron_jax.core import atomic, distributed, optional, preemption
from minitron_jax.errors import ConfigError
from minitron_jax.training.distill import GUARDED_METRICS, Batch, Distiller


class Diverged(RuntimeError):
  """The loss or gradient norm stopped being finite; training stopped before saving the bad
  state. The message names the run, the step and the last checkpoint saved before it."""


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
  return optional.module("grain", "checkpointing the training data's position (loop.train)")


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
