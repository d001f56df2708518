"""The `teacher_logits` stage: the teacher's top-k over the distillation stream, stored once
(teacher_store.py), so search retraining and distillation read it instead of running the teacher.

Putting the stage in `config.stages` is the switch: search and distill of that compression stage
then train from `<stage dir>/teacher_logits/train` (rows in the order the online run reads them)
and validate on `<stage dir>/teacher_logits/validation` (the run's fixed validation batches), and
never load the teacher. A store is refused in one line when anything it was made from differs
from the run: teacher, tokenizer, data, sequence length, k or temperature.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time

import ml_collections

from minitron_jax.checkpoints import build, checkpoint
from minitron_jax.core import atomic
from minitron_jax.inputs import data
from minitron_jax.models import sharding
from minitron_jax.run import stage_context
from minitron_jax.training import teacher_store
from minitron_jax.models.config import ModelConfig
from minitron_jax.errors import ConfigError

STAGE = "teacher_logits"
_STREAM_SETTINGS_ASIDE = ("batch_size", "read_threads", "read_buffer")  # rows do not depend on them


def enabled(cfg: ml_collections.ConfigDict) -> bool:
  return STAGE in cfg.stages


def check_section(cfg: ml_collections.ConfigDict) -> None:
  section = cfg.teacher_logits
  if section.dtype not in teacher_store.STORE_DTYPES:
    raise ConfigError(f"teacher_logits.dtype={section.dtype!r} is not supported; allowed: "
                      f"{sorted(teacher_store.STORE_DTYPES)}")
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
                      distill_steps: int | None = None) -> teacher_store.StoreMetadata:
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
  return teacher_store.StoreMetadata(
      teacher=_teacher_description(cfg, ref), teacher_config=config.to_dict(),
      tokenizer=str(cfg.tokenizer or cfg.model.hf_path), data={"split": split, **fields},
      seq_len=stream.seq_len, k=min(section.k, config.vocab_size),
      temperature=float(cfg.distill.loss.temperature), dtype=section.dtype,
      vocab_size=config.vocab_size, num_rows=rows, rows_per_shard=section.rows_per_shard,
      stream_sha256="")


def run(ctx) -> dict:
  """Writes (or finishes) both stores of this compression stage; its summary marks it done."""
  cfg, out = ctx.cfg, ctx.directory / STAGE
  started = time.perf_counter()
  mesh = stage_context.mesh_of(cfg)
  config, params = stage_context.load(cfg, ctx.teacher, mesh)
  config = config.replace(dtype=cfg.distill.dtype)
  tok = stage_context.load_tokenizer(cfg, config.vocab_size)
  shard = lambda shape: sharding.batch_sharding(mesh, shape)
  summary = {}
  for split in ("train", "validation"):
    meta = expected_metadata(cfg, ctx.teacher, config, split, ctx.distill_steps)
    if split == "train":
      batches = data.make_iterator(stage_context.data_config(cfg, batch_size=cfg.distill.batch_size,
                                                      seq_len=cfg.distill.seq_len), tok, "train")
    else:
      batches = iter(stage_context.validation(cfg, config.vocab_size))
    ctx.log(f"[{STAGE}] {split}: top-{meta.k} of the {ctx.teacher.label} teacher over "
            f"{meta.num_rows} rows of {meta.seq_len} tokens, {meta.bytes_per_token} bytes/token")
    split_started = time.perf_counter()
    written = teacher_store.write(out / split, meta, config, params, batches,
                                  batch_size=cfg.teacher_logits.batch_size, batch_sharding=shard,
                                  log=ctx.log)
    seconds = time.perf_counter() - split_started
    summary[split] = dict(rows=written.num_rows, tokens=written.num_rows * written.seq_len,
                          bytes_per_token=written.bytes_per_token, seconds=seconds,
                          stream_sha256=written.stream_sha256)
  summary.update(k=meta.k, dtype=meta.dtype, seconds=time.perf_counter() - started)
  atomic.write_json(out / "summary.json", summary)
  ctx.log(f"[{STAGE}] done in {summary['seconds']:.1f}s; stores in {out}")
  return summary


def retrain_inputs(cfg: ml_collections.ConfigDict, directory: pathlib.Path, ref,
                   config: ModelConfig, batch_size: int, steps: int,
                   distill_steps: int | None = None):
  """(train batch iterator, validation batches) from this stage's stores, each checked."""
  out = directory / STAGE
  for split, needed in (("train", steps * batch_size), ("validation", None)):
    expected = expected_metadata(cfg, ref, config, split, distill_steps)
    stored = teacher_store.StoreMetadata.load(out / split)
    stored.check_matches(expected, expected.num_rows if needed is None else needed)
  train = iter(teacher_store.dataset(out / "train", batch_size).to_iter_dataset())
  validation = list(teacher_store.dataset(out / "validation", int(cfg.data.batch_size)))
  return train, validation
