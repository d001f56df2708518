"""An offline teacher: its top-k log-probabilities over a token stream, computed once and read back
as batches by grain, so distillation and every search candidate's retraining skip the teacher.

Layout of a store directory:
  shard-00000.array_record ...  one record per packed row, in stream order, `rows_per_shard` rows
                                per shard (the last may hold fewer)
  metadata.json                 written last: what the store was made from (StoreMetadata)

A record is the row's tokens, segment ids and positions (int32 [T]), then the teacher's top-k
vocabulary indices [T,k] (uint16 when the vocabulary fits, else int32), log-probabilities [T,k]
(bfloat16 or float16) and the log of its remaining mass [T] (float32), as raw little-endian
bytes: fixed sizes the metadata gives, so decoding is one frombuffer per field.

Writing resumes: shards are renamed into place whole, and a rerun skips the rows of the shards
already there (reading, not recomputing, them: the stream hash still covers every row). With
several processes every one computes the teacher on the global batch and shard i is written by
process i mod P.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import time
from typing import Any, Callable, Iterable, Iterator

import grain
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from array_record.python import array_record_module

from minitron_jax.core import atomic, distributed
from minitron_jax.models import model
from minitron_jax.objectives import sparse_kld
from minitron_jax.models.config import ModelConfig
from minitron_jax.errors import ConfigError

FORMAT_VERSION = 1
STORE_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
ROW_KEYS = ("tokens", "segment_ids", "positions")
TEACHER_KEYS = ("teacher_indices", "teacher_log_probs", "teacher_tail")


@dataclasses.dataclass(frozen=True)
class StoreMetadata:
  """What a store holds and was made from; a run reading it must agree on `run_fields`."""

  teacher: str  # a description of the teacher's weights (checkpoint path or preset and seed)
  teacher_config: dict[str, Any]
  tokenizer: str
  data: dict[str, Any]  # the data config of the stream (batch size aside: rows are stored)
  seq_len: int
  k: int
  temperature: float
  dtype: str
  vocab_size: int
  num_rows: int
  rows_per_shard: int
  stream_sha256: str
  format_version: int = FORMAT_VERSION

  # The fields a run must match to read the store (num_rows only has to be enough).
  run_fields = ("teacher", "teacher_config", "tokenizer", "data", "seq_len", "k", "temperature",
                "format_version")

  @property
  def index_dtype(self) -> np.dtype:
    return np.dtype(np.uint16 if self.vocab_size <= 2**16 else np.int32)

  @property
  def bytes_per_token(self) -> int:
    """Storage per token: tokens, segment ids, positions, k indices and log-probs, the tail."""
    return 12 + self.k * (self.index_dtype.itemsize + 2) + 4

  @property
  def num_shards(self) -> int:
    return -(-self.num_rows // self.rows_per_shard)

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

  @classmethod
  def load(cls, directory: str | os.PathLike) -> "StoreMetadata":
    path = pathlib.Path(directory) / "metadata.json"
    if not path.is_file():
      raise ConfigError(f"no teacher logits store at {directory} (metadata.json missing); run the "
                        "teacher_logits stage first")
    try:
      fields = json.loads(path.read_text())
      return cls(**fields)
    except (ValueError, TypeError) as e:
      raise ConfigError(f"{path} is not a teacher store's metadata ({type(e).__name__}: "
                        f"{(str(e).splitlines() or [''])[0]})") from None

  def check_matches(self, expected: "StoreMetadata", rows_needed: int = 0) -> None:
    """One line naming the first field that differs from what the run would write."""
    for name in self.run_fields:
      have, want = getattr(self, name), getattr(expected, name)
      if have != want:
        raise ConfigError(f"teacher logits store was made with {name}={_short(have)}; this run "
                          f"has {name}={_short(want)}; allowed: a store made for this run "
                          "(delete it to rewrite it)")
    if rows_needed > self.num_rows:
      raise ConfigError(f"teacher logits store holds {self.num_rows} rows; this run reads "
                        f"{rows_needed}; allowed: a store with at least that many (delete it to "
                        "rewrite it for this run)")


def _short(value: Any) -> str:
  text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else repr(value)
  return text if len(text) <= 120 else text[:117] + "..."


def shard_path(directory: pathlib.Path, index: int) -> pathlib.Path:
  return directory / f"shard-{index:05d}.array_record"


# ----------------------------------------------------------------------------- records


def encode_row(row: dict[str, np.ndarray], meta: StoreMetadata) -> bytes:
  parts = [np.asarray(row[key], "<i4") for key in ROW_KEYS]
  parts.append(np.asarray(row["teacher_indices"]).astype(meta.index_dtype.newbyteorder("<")))
  parts.append(np.asarray(row["teacher_log_probs"]).astype(STORE_DTYPES[meta.dtype]))
  parts.append(np.asarray(row["teacher_tail"], "<f4"))
  return b"".join(np.ascontiguousarray(part).tobytes() for part in parts)


def decode_row(record: bytes, meta: StoreMetadata) -> dict[str, np.ndarray]:
  t, k = meta.seq_len, meta.k
  fields = [(key, np.dtype("<i4"), (t,)) for key in ROW_KEYS] + [
      ("teacher_indices", meta.index_dtype.newbyteorder("<"), (t, k)),
      ("teacher_log_probs", np.dtype(STORE_DTYPES[meta.dtype]), (t, k)),
      ("teacher_tail", np.dtype("<f4"), (t,))]
  out, offset = {}, 0
  for key, dtype, shape in fields:
    count = int(np.prod(shape))
    out[key] = np.frombuffer(record, dtype, count, offset).reshape(shape)
    offset += count * dtype.itemsize
  if offset != len(record):
    raise ConfigError(f"teacher store record holds {len(record)} bytes; the metadata describes "
                      f"{offset}")
  out["teacher_indices"] = out["teacher_indices"].astype(np.int32)
  return out


def _row_hash_update(digest, row: dict[str, np.ndarray]) -> None:
  for key in ROW_KEYS:
    digest.update(np.ascontiguousarray(np.asarray(row[key], "<i4")).tobytes())


# ----------------------------------------------------------------------------- writing


# Tokens whose logits exist at once while ranking: [256, V'] float32 per device (128 MiB at a
# 128k vocabulary, unsplit), never [tokens, V].
TOP_K_CHUNK = 256


def teacher_outputs(config: ModelConfig, params, batch: dict[str, np.ndarray], k: int,
                    temperature: float, chunk_size: int = TOP_K_CHUNK):
  """The teacher's top-k (log-probabilities, indices, log tail) of a batch [B,T], its logits made
  `chunk_size` tokens at a time."""
  return _top_k(config, params, *(jnp.asarray(batch[key]) for key in ROW_KEYS), k=k,
                temperature=temperature, chunk_size=chunk_size)


def _top_k_impl(config, params, tokens, segment_ids, positions, k, temperature, chunk_size):
  hidden, _ = model.hidden_states(config, params, tokens, segment_ids=segment_ids,
                                  positions=positions)
  return sparse_kld.teacher_top_k_of_hidden(
      hidden, model.lm_head_kernel(config, params), k, temperature, chunk_size=chunk_size,
      cap=config.final_logit_softcap)


_top_k = jax.jit(_top_k_impl, static_argnames=("config", "k", "temperature", "chunk_size"))


def write(directory: str | os.PathLike, meta: StoreMetadata, teacher_config: ModelConfig,
          teacher_params, batches: Iterable[dict[str, np.ndarray]], *, batch_size: int = 8,
          batch_sharding: Callable[[tuple[int, ...]], Any] | None = None,
          log: Callable[[str], None] | None = None,
          stop_after_shards: int | None = None) -> StoreMetadata:
  """Writes (or finishes) the store of `meta.num_rows` rows taken from `batches` in order.

  The teacher runs `batch_size` rows at a time (with `batch_sharding`, over a mesh).
  `meta.stream_sha256` is ignored and filled in; returns the metadata written. A store whose
  metadata.json exists is complete and is checked against `meta`, not rewritten.
  `stop_after_shards` (tests) returns after writing that many new shards, as a kill would.
  """
  directory = pathlib.Path(directory)
  log = log or (lambda message: None)
  if (directory / "metadata.json").is_file():
    existing = StoreMetadata.load(directory)
    existing.check_matches(meta, meta.num_rows)
    return existing
  if meta.dtype not in STORE_DTYPES:
    raise ConfigError(f"teacher store dtype={meta.dtype!r} is not supported; allowed: "
                      f"{sorted(STORE_DTYPES)}")
  directory.mkdir(parents=True, exist_ok=True)
  done = 0
  while done < meta.num_shards and shard_path(directory, done).is_file():
    done += 1
  digest = hashlib.sha256()
  rows = _rows(batches)
  process, processes = jax.process_index(), jax.process_count()
  written = rows_written = 0
  started = time.perf_counter()
  for shard in range(meta.num_shards):
    count = min(meta.rows_per_shard, meta.num_rows - shard * meta.rows_per_shard)
    if shard < done:  # already on disk: read the stream past it, hashing its rows
      for _ in range(count):
        _row_hash_update(digest, _next_row(rows, meta))
      continue
    records = []
    while len(records) < count:
      batch = _next_batch(rows, meta, min(batch_size, count - len(records)))
      for row in _teacher_rows(teacher_config, teacher_params, batch, meta, batch_sharding):
        _row_hash_update(digest, row)
        records.append(encode_row(row, meta))
    if shard % processes == process:
      _write_shard(shard_path(directory, shard), records)
    written += 1
    rows_written += count
    elapsed = time.perf_counter() - started
    log(f"[teacher_logits] shard {shard + 1}/{meta.num_shards}: "
        f"{rows_written * meta.seq_len / elapsed:,.0f} tokens/s, {elapsed:.1f}s")
    if stop_after_shards is not None and written >= stop_after_shards:
      return meta
  distributed.barrier(f"teacher store {directory}")
  final = dataclasses.replace(meta, stream_sha256=digest.hexdigest())
  atomic.write_text(directory / "metadata.json", final.to_json())
  distributed.barrier(f"teacher store metadata {directory}")
  return final


def _rows(batches: Iterable[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
  for batch in batches:
    for i in range(len(batch["tokens"])):
      yield {key: np.asarray(batch[key][i]) for key in ROW_KEYS}


def _next_row(rows: Iterator, meta: StoreMetadata) -> dict[str, np.ndarray]:
  try:
    row = next(rows)
  except StopIteration:
    raise ConfigError(f"the data stream ended before {meta.num_rows} rows; allowed: "
                      "teacher_logits.num_rows within the stream (or more epochs)") from None
  if row["tokens"].shape != (meta.seq_len,):
    raise ConfigError(f"a data row has shape {row['tokens'].shape}; the store is for seq_len="
                      f"{meta.seq_len}")
  return row


def _next_batch(rows: Iterator, meta: StoreMetadata, size: int) -> dict[str, np.ndarray]:
  taken = [_next_row(rows, meta) for _ in range(size)]
  return {key: np.stack([row[key] for row in taken]) for key in ROW_KEYS}


def _teacher_rows(config, params, batch, meta, batch_sharding):
  arrays = batch
  if batch_sharding is not None:
    arrays = {key: distributed.put(value, batch_sharding(value.shape))
              for key, value in batch.items()}
  log_probs, indices, tail = distributed.to_host(
      teacher_outputs(config, params, arrays, meta.k, meta.temperature))
  for i in range(len(batch["tokens"])):
    yield {**{key: batch[key][i] for key in ROW_KEYS}, "teacher_indices": indices[i],
           "teacher_log_probs": log_probs[i], "teacher_tail": tail[i]}


def _write_shard(path: pathlib.Path, records: list[bytes]) -> None:
  tmp = path.with_name(f".{path.name}.tmp")
  writer = array_record_module.ArrayRecordWriter(str(tmp), "group_size:1")
  for record in records:
    writer.write(record)
  writer.close()
  os.replace(tmp, path)


# ----------------------------------------------------------------------------- reading


class _Decode(grain.transforms.Map):

  def __init__(self, meta: StoreMetadata):
    self.meta = meta

  def map(self, record: bytes) -> dict[str, np.ndarray]:
    return decode_row(record, self.meta)


def dataset(directory: str | os.PathLike, batch_size: int) -> grain.MapDataset:
  """The store's rows in stream order, batched (the last incomplete batch dropped)."""
  directory = pathlib.Path(directory)
  meta = StoreMetadata.load(directory)
  paths = [str(shard_path(directory, i)) for i in range(meta.num_shards)]
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise ConfigError(f"teacher logits store {directory} lacks {len(missing)} shard(s), e.g. "
                      f"{missing[0]}; allowed: a complete store")
  source = grain.sources.ArrayRecordDataSource(paths)
  return grain.MapDataset.source(source).map(_Decode(meta)).batch(batch_size,
                                                                  drop_remainder=True)
