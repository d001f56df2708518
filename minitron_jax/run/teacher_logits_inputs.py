"""The stored (offline) teacher as the retraining stages read it: the store's settings
(`StoreSettings`, in the plan when `teacher_logits` is in the run's stages), what a store must
have been made from, and the checked train and validation batches it gives. The teacher_logits
stage writes the stores.

A store is refused in one line when anything it was made from differs from the run: teacher,
tokenizer, data, sequence length, k or temperature.
"""

from __future__ import annotations

import dataclasses
import pathlib

from minitron_jax.inputs import data
from minitron_jax.models.config import ModelConfig
from minitron_jax.run import registry
from minitron_jax.run.stage_context import ModelRef, Plan
from minitron_jax.training import teacher_logits_store

STAGE = "teacher_logits"
_STREAM_SETTINGS_ASIDE = ("batch_size", "read_threads", "read_buffer")  # rows do not depend on them


@dataclasses.dataclass(frozen=True)
class StoreSettings:
  """k, dtype, rows_per_shard, batch_size: the store's own; train: the distillation stream it
  stores; compute_dtype and temperature: how the teacher runs and is softened; distill_steps and
  search_steps: the readers' steps (None for a reader not in the run)."""

  k: int
  dtype: str
  rows_per_shard: int
  batch_size: int
  train: data.DataConfig
  compute_dtype: str
  temperature: float
  distill_steps: int | None
  search_steps: int | None

  def train_rows(self, distill_steps: int | None = None) -> int:
    """Rows the longest reader needs: distillation (`distill_steps` for a compression stage that
    sets its own) or one search candidate's retraining."""
    steps = []
    if self.distill_steps is not None:
      steps.append(distill_steps or self.distill_steps)
    if self.search_steps is not None:
      steps.append(self.search_steps)
    return max(steps, default=0) * self.train.batch_size


def teacher_config(plan: Plan, ref: ModelRef) -> ModelConfig:
  """The teacher's architecture, without reading its weights."""
  return plan.model_config(ref).replace(dtype=plan.settings_of(STAGE).compute_dtype)


def _teacher_description(plan: Plan, ref: ModelRef) -> str:
  if ref.path is not None:
    return f"{ref.label} at {ref.path}"
  return f"{ref.label}: {plan.model.describe()}"


def expected_metadata(plan: Plan, ref: ModelRef, config: ModelConfig, split: str,
                      distill_steps: int | None = None) -> teacher_logits_store.StoreMetadata:
  """What the store of `split` ("train" or "validation") must have been made from."""
  settings: StoreSettings = plan.settings_of(STAGE)
  if split == "train":
    stream, rows = settings.train, settings.train_rows(distill_steps)
  else:
    stream = plan.data
    rows = plan.eval_batches * stream.batch_size
  fields = {k: v for k, v in dataclasses.asdict(stream).items()
            if k not in _STREAM_SETTINGS_ASIDE}
  fields = {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}
  return teacher_logits_store.StoreMetadata(
      teacher=_teacher_description(plan, ref), teacher_config=config.to_dict(),
      tokenizer=str(plan.tokenizer or plan.model.hf_path), data={"split": split, **fields},
      seq_len=stream.seq_len, k=min(settings.k, config.vocab_size),
      temperature=settings.temperature, dtype=settings.dtype,
      vocab_size=config.vocab_size, num_rows=rows, rows_per_shard=settings.rows_per_shard,
      stream_sha256="")


def retrain_inputs(plan: Plan, directory: pathlib.Path, ref: ModelRef, config: ModelConfig,
                   batch_size: int, steps: int, distill_steps: int | None = None):
  """(train batch iterator, validation batches) from this stage's stores, each checked."""
  for split, needed in (("train", steps * batch_size), ("validation", None)):
    expected = expected_metadata(plan, ref, config, split, distill_steps)
    stored = teacher_logits_store.StoreMetadata.load(registry.path(directory, STAGE, split))
    stored.check_matches(expected, expected.num_rows if needed is None else needed)
  train = iter(teacher_logits_store.dataset(registry.path(directory, STAGE, "train"),
                                            batch_size).to_iter_dataset())
  validation = list(teacher_logits_store.dataset(registry.path(directory, STAGE, "validation"),
                                                 plan.data.batch_size))
  return train, validation
