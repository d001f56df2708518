"""Packed token batches for distillation, from TFDS datasets or local files, through grain.

Every source becomes a random-access grain `MapDataset` of documents, so shuffling is an index
permutation (seeded, different each epoch, no shuffle buffer) and the iterator state is a few
integers that orbax saves beside the model. Documents are tokenised, then grain's
`ConcatThenSplitIterDataset` packs them into rows of exactly `seq_len` tokens: documents follow each
other, a long document continues in the next row instead of being dropped or truncated, and only
the last row of a finite pass is padded.

Batch format (all int32 numpy, [batch_size, seq_len]):
  tokens       token ids; padding is id 0, so always mask with segment_ids
  segment_ids  1, 2, ... numbering the documents (or document pieces) inside a row; 0 is padding
  positions    0, 1, ... restarting at every segment (a continued document restarts at 0 too)
Targets are not shifted here: the loss predicts token t+1 from tokens <= t inside one segment.

Sources (`DataConfig.source`):
  stdlib   the embedded corpus, prepared locally as a TFDS array_record dataset (`stdlib_dataset`)
  tfds     any TFDS dataset already prepared as array_record under data_dir; never downloaded
  text     local files (globs), each file one document (`text_source`)
  jsonl    local JSON-lines files (globs), each line one document, text under `text_field`
  parquet  parquet files (globs, directories), each row one document: the `text_field` column,
           text or token ids (`columnar_source`)
  arrow    Arrow IPC files and streams, `save_to_disk` directories: as parquet
or a weighted mixture of them, "parquet:/data/web/*.parquet@0.7,arrow:/data/code@0.3"
(`source_spec`): each component is packed on its own and the rows are mixed by weight.
Parquet and Arrow documents are shuffled by blocks of row groups / record batches, the rest
globally. Pre-tokenized documents (a column of integer lists) are used as given: no eos is added.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from minitron_jax.core import optional
from minitron_jax.inputs import columnar_source, source_spec
from minitron_jax.errors import ConfigError
# nested_field stays reachable as data.nested_field: evaluation tasks read records with it.
from minitron_jax.inputs.text_source import LocalTextSource, as_text, expand_globs, nested_field
from minitron_jax.inputs.tokenizer import Tokenizer

grain = optional.module("grain", "the data pipeline (minitron_jax.inputs.data)")

SOURCES = ("stdlib", "tfds", "text", "jsonl", "parquet", "arrow")
PATH_SOURCES = ("text", "jsonl", "parquet", "arrow")
SPLITS = ("train", "validation")
BATCH_KEYS = ("tokens", "segment_ids", "positions")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where documents come from and how they become batches. See the module docstring."""

  # A kind from SOURCES, or components "KIND:WHERE#COLUMN@WEIGHT,..." (minitron_jax.inputs.source_spec).
  source: str = "stdlib"
  seq_len: int = 256
  batch_size: int = 8
  seed: int = 0
  # Shuffle training documents (a fresh seeded permutation each epoch); validation never shuffles.
  shuffle: bool = True
  # Passes over the training documents; None repeats forever. Validation is always one pass. A
  # mixture ends when its first component has made them.
  num_epochs: int | None = None
  # TFDS data dir. None: TFDS's own default for `tfds`, stdlib_dataset.default_data_dir() for
  # `stdlib`.
  data_dir: str | None = None
  # `tfds`: the dataset, e.g. "wikipedia/20230601.en" or "c4/en:3.1.0".
  tfds_name: str = ""
  # `stdlib` and `tfds`: TFDS split strings (slices like "train[:95%]" work). `arrow`: the splits
  # of a save_to_disk DatasetDict.
  train_split: str = "train"
  validation_split: str = "validation"
  # `tfds` and `jsonl`: the feature holding the text; "a/b" reaches into nested features.
  # `parquet` and `arrow`: the column, of text or of token ids (lists of integers).
  text_field: str = "text"
  # `text`, `jsonl`, `parquet` and `arrow`: file globs for training and for validation.
  paths: tuple[str, ...] = ()
  validation_paths: tuple[str, ...] = ()
  # Without validation_paths (or a DatasetDict's validation split): this percentage of documents,
  # chosen by a hash of "file name" (text), "file name:line number" (jsonl) or file name and row
  # (parquet, arrow), is validation; the rest is training.
  validation_percent: int = 5
  # Threads that read and tokenise documents ahead of packing (0: in the caller's thread), and how
  # many documents they may run ahead (per mixture component).
  read_threads: int = 2
  read_buffer: int = 16

  def __post_init__(self):
    for name in ("paths", "validation_paths"):
      object.__setattr__(self, name, _as_tuple(getattr(self, name)))

    def need(condition: bool, message: str):
      if not condition:
        raise ConfigError(message)

    parts = source_spec.parse(self.source, SOURCES)
    for name in ("seq_len", "batch_size"):
      value = getattr(self, name)
      need(isinstance(value, int) and value > 0,
           f"data {name}={value!r} must be a positive integer")
    need(isinstance(self.seed, int) and 0 <= self.seed < 2**32,
         f"data seed={self.seed!r} must be an integer in [0, 2**32)")
    need(self.num_epochs is None or (isinstance(self.num_epochs, int) and self.num_epochs > 0),
         f"data num_epochs={self.num_epochs!r} must be a positive integer or None (forever)")
    need(0 <= self.validation_percent <= 100,
         f"data validation_percent={self.validation_percent!r} must be in [0, 100]")
    need(self.read_threads >= 0, f"data read_threads={self.read_threads!r} must be >= 0")
    need(self.read_buffer >= 0, f"data read_buffer={self.read_buffer!r} must be >= 0")
    if source_spec.is_plain(self.source):
      if self.source == "tfds":
        need(bool(self.tfds_name), "data source='tfds' needs tfds_name (e.g. 'c4/en:3.1.0')")
      if self.source in PATH_SOURCES:
        need(bool(self.paths), f"data source={self.source!r} needs paths (file globs)")
      return
    need(len(parts) == 1 or not self.validation_paths,
         f"data validation_paths={self.validation_paths} serve one source; source="
         f"{self.source!r} mixes {len(parts)}: leave them empty (each component then draws "
         "validation_percent of its documents)")
    need(not self.paths or any(p.kind in PATH_SOURCES and not p.where for p in parts),
         f"data paths={self.paths} are not used: every component of source={self.source!r} "
         "names its own")
    self.components()  # each component's own settings are checked here, naming it

  def components(self) -> tuple[tuple[DataConfig, float], ...]:
    """(settings of one plain source, weight) per component of `source`. Components other than
    the first shuffle with seeds of their own."""
    if source_spec.is_plain(self.source):
      return ((self, 1.0),)
    out = []
    for i, part in enumerate(source_spec.parse(self.source, SOURCES)):
      changes: dict[str, Any] = dict(source=part.kind, seed=(self.seed + 7919 * i) % 2**32)
      if part.where:
        changes["tfds_name" if part.kind == "tfds" else "paths"] = (
            part.where if part.kind == "tfds" else (part.where,))
      if part.column:
        changes["text_field"] = part.column
      out.append((self.replace(**changes), part.weight or 1.0))
    return tuple(out)

  def replace(self, **changes) -> DataConfig:
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_dict(cls, fields: dict[str, Any]) -> DataConfig:
    """From a plain or ml_collections dict; unknown keys are refused."""
    fields = dict(fields)
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise ConfigError(f"data config fields {unknown} are unknown")
    return cls(**fields)


def _as_tuple(paths: str | Sequence[str]) -> tuple[str, ...]:
  """A glob list from a tuple, a list, or one comma-separated string (as command lines give it)."""
  if isinstance(paths, (str, os.PathLike)):
    paths = str(paths).split(",")
  return tuple(str(p).strip() for p in paths if str(p).strip())


# ---------------------------------------------------------------------------------------------
# Document sources: random-access sequences of str (or of token ids, from parquet and arrow).


def _local_source(config: DataConfig, split: str) -> LocalTextSource:
  if split == "validation" and config.validation_paths:
    files = expand_globs(config.validation_paths, "validation_paths")
    return LocalTextSource(files, config.source, config.text_field)
  files = expand_globs(config.paths, "paths")
  if config.validation_paths:  # train: every document of `paths`
    return LocalTextSource(files, config.source, config.text_field)
  return LocalTextSource(files, config.source, config.text_field, split=split,
                         validation_percent=config.validation_percent)


def _columnar_files(config: DataConfig, split: str) -> list[tuple[str, bool]]:
  splits = dict(train_split=config.train_split, validation_split=config.validation_split)
  if split == "validation" and config.validation_paths:
    return columnar_source.resolve(config.source, config.validation_paths, "validation_paths",
                                   split, dedicated=True, **splits)
  return columnar_source.resolve(config.source, config.paths, "paths", split,
                                 dedicated=bool(config.validation_paths), **splits)


def _tfds_source(name: str, split: str, data_dir: str | None) -> Sequence[Any]:
  """tfds.data_source for a dataset that must already be prepared locally as array_record."""
  tfds = optional.module("tensorflow_datasets", f"data source {name!r} (TFDS)")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError:
    raise ConfigError(f"tfds_name={name!r} is neither a registered TFDS dataset nor prepared "
                      f"under data_dir={data_dir!r}") from None
  except Exception as e:  # a dataset module may fail to import its own dependencies
    raise ConfigError(f"tfds_name={name!r} could not be loaded: "
                      f"{(str(e).splitlines() or [type(e).__name__])[0]}") from None
  if not builder.is_prepared():
    raise ConfigError(f"TFDS dataset {name!r} is not prepared under {builder.data_dir}; prepare "
                      "it there with file_format='array_record' (this project never downloads)")
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except NotImplementedError:
    file_format = getattr(builder.info.file_format, "value", "another")
    raise ConfigError(f"TFDS dataset {name!r} is prepared in {file_format} format; "
                      "random access needs file_format='array_record'") from None
  except (ValueError, KeyError) as e:
    raise ConfigError(f"split={split!r} of TFDS dataset {name!r} is not valid: "
                      f"{(str(e).splitlines() or [type(e).__name__])[0]}") from None


def _extract_text(record: Any, field: str, name: str) -> str:
  return as_text(nested_field(record, field, f"records of {name!r}", f"text_field={field!r}"))


def check_source(config: DataConfig) -> None:
  """What `documents` would refuse before reading any document: globs that match no file, a TFDS
  dataset or split that is not prepared locally, parquet / Arrow files that are not, or lack the
  column, for every component. (The stdlib corpus is built on first use.)"""
  for part, _ in config.components():
    if part.source in ("text", "jsonl"):
      expand_globs(part.paths, "paths")
      if part.validation_paths:
        expand_globs(part.validation_paths, "validation_paths")
    elif part.source in columnar_source.KINDS:
      files = {f for split in SPLITS for f, _ in _columnar_files(part, split)}
      columnar_source.check(part.source, sorted(files), part.text_field)
    elif part.source == "tfds":
      for split in (part.train_split, part.validation_split):
        _tfds_source(part.tfds_name, split, part.data_dir)


def _documents(config: DataConfig, split: str) -> tuple[grain.MapDataset, int]:
  """(documents, shuffle block): a block > 1 is what a reader of whole units shuffles by."""
  if split not in SPLITS:
    raise ConfigError(f"split={split!r} is not supported; allowed: {SPLITS}")
  parts = config.components()
  if len(parts) > 1:
    raise ConfigError(f"data source={config.source!r} mixes {len(parts)} sources; read each of "
                      "DataConfig.components() on its own")
  config = parts[0][0]
  block = 1
  if config.source in ("text", "jsonl"):
    docs = grain.MapDataset.source(_local_source(config, split))
  elif config.source in columnar_source.KINDS:
    source = columnar_source.ColumnarSource(
        config.source, _columnar_files(config, split), config.text_field, split,
        config.validation_percent)
    docs, block = grain.MapDataset.source(source), source.block_size
  else:
    tfds_split = config.train_split if split == "train" else config.validation_split
    if config.source == "stdlib":
      # tensorflow-datasets is imported only for the sources that read through it.
      from minitron_jax.inputs import stdlib_dataset  # pylint: disable=g-import-not-at-top
      name = f"{stdlib_dataset.NAME}/{stdlib_dataset.config_name()}"
      data_dir = str(stdlib_dataset.prepare(config.data_dir).data_dir_root)
      field = "text"
    else:
      name, data_dir, field = config.tfds_name, config.data_dir, config.text_field
    records = _tfds_source(name, tfds_split, data_dir)
    if len(records):
      _extract_text(records[0], field, name)  # a wrong field fails here, not in a reader thread
    docs = grain.MapDataset.source(records).map(
        functools.partial(_extract_text, field=field, name=name))
  if not len(docs):
    raise ConfigError(f"the {split} split of data source={config.source!r} has no documents")
  return docs, block


def documents(config: DataConfig, split: str = "train") -> grain.MapDataset:
  """The split's documents as a grain MapDataset of str (or of int32 token ids, from a parquet /
  Arrow column of integer lists), in a stable order. One source, not a mixture."""
  return _documents(config, split)[0]


# ---------------------------------------------------------------------------------------------
# Tokenising, packing, batching.


class _Tokenize:
  """str -> {'tokens': int32 ids}, eos appended when the tokenizer has one. Token ids (from a
  pre-tokenized column) pass as given, once checked against the tokenizer's vocabulary."""

  def __init__(self, tokenizer: Tokenizer):
    self.tokenizer = tokenizer

  def __call__(self, document: str | np.ndarray) -> dict[str, np.ndarray]:
    if isinstance(document, np.ndarray):
      vocab = self.tokenizer.vocab_size
      if document.size and (document.min() < 0 or document.max() >= vocab):
        bad = document.min() if document.min() < 0 else document.max()
        raise ConfigError(f"a pre-tokenized document holds token id {int(bad)}; tokenizer "
                          f"{self.tokenizer.name!r} allows [0, {vocab}): set config.tokenizer "
                          "to the tokenizer that made them")
      return {"tokens": document.astype(np.int32)}
    ids = self.tokenizer.encode(document)
    if self.tokenizer.eos_id is not None:
      ids = [*ids, self.tokenizer.eos_id]
    return {"tokens": np.asarray(ids, dtype=np.int32)}


def _not_empty(example: dict[str, np.ndarray]) -> bool:
  # An empty document would still take a segment id in the packer and leave a gap in the numbering.
  return example["tokens"].size > 0


def _rename(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {"tokens": row["tokens"], "segment_ids": row["tokens_segment_ids"],
          "positions": row["tokens_positions"]}


class _JsonSafePackerIterator(grain.DatasetIterator):
  """Passes through a ConcatThenSplit iterator, repairing its state after a JSON round trip.

  grain 0.2.18's packer marks "no partial document" with the tuple (-1, -1) and compares with
  `!=`; grain's orbax handler stores state as JSON, which returns a list, so a restored packer
  would think it holds a remainder and silently drop the next document. Turning the slices back
  into tuples before `set_state` keeps restore exact (tested in tests/test_data.py).
  """

  def __next__(self):
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    slices = {k: tuple(v) for k, v in state["remainder_slices"].items()}
    self._parent.set_state({**state, "remainder_slices": slices})


class _JsonSafePacker(grain.IterDataset):

  def __iter__(self) -> grain.DatasetIterator:
    return _JsonSafePackerIterator(self._parent.__iter__())


def pack(examples: grain.IterDataset, seq_len: int) -> grain.IterDataset:
  """{'tokens': [n]} documents -> rows of {'tokens', 'segment_ids', 'positions'}, each [seq_len]."""
  packed = grain.experimental.ConcatThenSplitIterDataset(
      examples, length_struct={"tokens": seq_len}, split_full_length_features=True)
  return _JsonSafePacker(packed).map(_rename)


def _rows(config: DataConfig, tokenizer: Tokenizer, split: str, training: bool,
          shard_index: int, shard_count: int) -> grain.IterDataset:
  """One plain source's packed rows."""
  docs, block = _documents(config, split)
  if shard_count > 1:
    docs = docs[shard_index::shard_count]
  if training:
    if config.shuffle and block > 1:
      docs = columnar_source.BlockShuffleMapDataset(docs, block_size=block // shard_count,
                                                    seed=config.seed)
    elif config.shuffle:
      docs = docs.shuffle(seed=config.seed)
    docs = docs.repeat(config.num_epochs)
  examples = docs.map(_Tokenize(tokenizer)).filter(_not_empty).to_iter_dataset(
      grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=config.read_buffer))
  return pack(examples, config.seq_len)


def make_dataset(config: DataConfig, tokenizer: Tokenizer, split: str = "train", *,
                 training: bool | None = None, shard_index: int = 0,
                 shard_count: int = 1) -> grain.IterDataset:
  """The batch pipeline for `split` as a grain IterDataset (see the module docstring).

  training (default: split == "train"): shuffled per epoch when config.shuffle, repeated
  config.num_epochs times (None: forever), the last incomplete batch dropped. Otherwise: one pass
  in order, the last batch padded with all-padding rows (segment_ids 0). shard_index/shard_count
  give each host its own documents (e.g. jax.process_index(), jax.process_count()); batch_size is
  then per host. A mixture packs each component on its own and interleaves their rows in
  proportion to the weights (a fixed pattern: deterministic, and a row's share is a token share).
  """
  if not 0 <= shard_index < shard_count:
    raise ConfigError(f"shard_index={shard_index} must be in [0, shard_count={shard_count})")
  training = split == "train" if training is None else training
  parts = config.components()
  streams = [_rows(part, tokenizer, split, training, shard_index, shard_count)
             for part, _ in parts]
  rows = streams[0] if len(streams) == 1 else grain.IterDataset.mix(
      streams, [weight for _, weight in parts])
  if training:
    return rows.batch(config.batch_size, drop_remainder=True)
  return rows.batch(config.batch_size, batch_fn=functools.partial(
      grain.experimental.batch_and_pad, batch_size=config.batch_size))


def make_iterator(config: DataConfig, tokenizer: Tokenizer, split: str = "train", *,
                  training: bool | None = None, shard_index: int = 0,
                  shard_count: int = 1) -> grain.DatasetIterator:
  """An iterator of batches; checkpoint it with grain.checkpoint.CheckpointSave/CheckpointRestore.

  Two iterators from equal configs yield equal batches; `get_state()`/`set_state()` (or orbax)
  resume exactly where a saved one stopped. Arguments as for `make_dataset`.
  """
  return iter(make_dataset(config, tokenizer, split, training=training, shard_index=shard_index,
                           shard_count=shard_count))


def validation_batches(config: DataConfig, tokenizer: Tokenizer, num_batches: int,
                       split: str = "validation") -> list[dict[str, np.ndarray]]:
  """The first `num_batches` batches of one in-order pass (fewer if the split is smaller).

  The same list every call: no shuffling, and the pass starts at the first document.
  """
  if num_batches <= 0:
    raise ConfigError(f"num_batches={num_batches} must be positive")
  return list(itertools.islice(make_iterator(config, tokenizer, split, training=False),
                               num_batches))
