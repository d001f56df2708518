"""The stored (offline) teacher as the retraining stages read it: whether the run stores the
teacher (`teacher_logits` in its stages), the store's settings, what a store must have been made
from, and the checked train and validation batches it gives. teacher_logits.py writes the stores.

A store is refused in one line when anything it was made from differs from the run: teacher,
tokenizer, data, sequence length, k or temperature.
"""

from __future__ import annotations

import dataclasses
import pathlib

import ml_collections

from minitron_jax.checkpoints import build, checkpoint
from minitron_jax.errors import ConfigError
from minitron_jax.models.config import ModelConfig
from minitron_jax.run import registry, stage_context
from minitron_jax.training import teacher_logits_store

STAGE = "teacher_logits"
_STREAM_SETTINGS_ASIDE = ("batch_size", "read_threads", "read_buffer")  # rows do not depend on them


def enabled(cfg: ml_collections.ConfigDict) -> bool:
  return STAGE in cfg.stages


def check_section(cfg: ml_collections.ConfigDict) -> None:
  section = cfg.teacher_logits
  if section.dtype not in teacher_logits_store.STORE_DTYPES:
    raise ConfigError(f"teacher_logits.dtype={section.dtype!r} is not supported; allowed: "
                      f"{sorted(teacher_logits_store.STORE_DTYPES)}")
  for name in ("k", "rows_per_shard", "batch_size"):
    value = section[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ConfigError(f"teacher_logits.{name}={value!r} must be a positive integer")


def teacher_config(cfg: ml_collections.ConfigDict, ref) -> ModelConfig:
  """The teacher's architecture, without reading its weights."""
  config = (build.model_config(cfg.model) if ref.path is None
            else checkpoint.load_config(ref.path))
  return config.replace(dtype=cfg.distill.dtype)


def _teacher_description(cfg: ml_collections.ConfigDict, ref) -> str:
  if ref.path is not None:
    return f"{ref.label} at {ref.path}"
  if cfg.model.get("hf_path"):
    return f"{ref.label}: {cfg.model.hf_path}"
  return f"{ref.label}: preset {cfg.model.preset}, seed {cfg.model.get('seed', 0)}"


def train_rows(cfg: ml_collections.ConfigDict, distill_steps: int | None) -> int:
  """Rows the longest reader needs: distillation or one search candidate's retraining."""
  steps = []
  if "distill" in cfg.stages:
    steps.append(distill_steps or cfg.distill.steps)
  if "search" in cfg.stages:
    steps.append(cfg.search.retrain_steps)
  return max(steps, default=0) * cfg.distill.batch_size


def expected_metadata(cfg: ml_collections.ConfigDict, ref, config: ModelConfig, split: str,
                      distill_steps: int | None = None) -> teacher_logits_store.StoreMetadata:
  """What the store of `split` ("train" or "validation") must have been made from."""
  section = cfg.teacher_logits
  if split == "train":
    stream = stage_context.data_config(cfg, batch_size=cfg.distill.batch_size,
                                seq_len=cfg.distill.seq_len)
    rows = train_rows(cfg, distill_steps)
  else:
    stream = stage_context.data_config(cfg)
    rows = cfg.eval_batches * stream.batch_size
  fields = {k: v for k, v in dataclasses.asdict(stream).items()
            if k not in _STREAM_SETTINGS_ASIDE}
  fields = {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}
  return teacher_logits_store.StoreMetadata(
      teacher=_teacher_description(cfg, ref), teacher_config=config.to_dict(),
      tokenizer=str(cfg.tokenizer or cfg.model.hf_path), data={"split": split, **fields},
      seq_len=stream.seq_len, k=min(section.k, config.vocab_size),
      temperature=float(cfg.distill.loss.temperature), dtype=section.dtype,
      vocab_size=config.vocab_size, num_rows=rows, rows_per_shard=section.rows_per_shard,
      stream_sha256="")


def retrain_inputs(cfg: ml_collections.ConfigDict, directory: pathlib.Path, ref,
                   config: ModelConfig, batch_size: int, steps: int,
                   distill_steps: int | None = None):
  """(train batch iterator, validation batches) from this stage's stores, each checked."""
  for split, needed in (("train", steps * batch_size), ("validation", None)):
    expected = expected_metadata(cfg, ref, config, split, distill_steps)
    stored = teacher_logits_store.StoreMetadata.load(registry.path(directory, STAGE, split))
    stored.check_matches(expected, expected.num_rows if needed is None else needed)
  train = iter(teacher_logits_store.dataset(registry.path(directory, STAGE, "train"),
                                     batch_size).to_iter_dataset())
  validation = list(teacher_logits_store.dataset(registry.path(directory, STAGE, "validation"),
                                          int(cfg.data.batch_size)))
  return train, validation
