"""Documents from parquet and Arrow files, read one row group or record batch at a time.

Data kept the way users keep it, read with pyarrow alone:
  parquet  parquet files; a directory stands for every *.parquet file under it
  arrow    Arrow IPC files (`.arrow`, `.feather` v2), Arrow IPC streams (the `.arrow` shards
           Hugging Face `datasets` writes), and directories written by `save_to_disk`: a Dataset
           (state.json and data-*.arrow) or a DatasetDict (dataset_dict.json and one Dataset
           directory per split)

`ColumnarSource` is a grain random-access source (__len__, __getitem__). Its index holds one entry
per unit, a parquet row group or an Arrow record batch, taken from metadata only: parquet footers,
the Arrow file footer, or the message headers of an Arrow stream (with their byte offsets, so a
stream's batch is read by seeking to it). Reading a document decodes the one column of its unit and
keeps the last `CACHED_UNITS` units: memory holds a few units, never a file. A document is the
column's value: text (a string column) or token ids (a column of integer lists, as int32 numpy).

A global shuffle would decode a unit per document; `BlockShuffleMapDataset` shuffles what such a
reader can serve: blocks of consecutive documents in a seeded order, and the documents inside each
block, anew every epoch.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import pathlib
import threading
import zlib
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from minitron_jax.errors import ConfigError

KINDS = ("parquet", "arrow")
# Units decoded and kept per source: a shuffle block spans SHUFFLE_UNITS (plus one it straddles),
# and reader threads running ahead may start on the next block.
SHUFFLE_UNITS = 4
CACHED_UNITS = 8


def _first_line(e: Exception) -> str:
  return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


# ---------------------------------------------------------------------------------------------
# Files: globs, directories and `save_to_disk` layouts.


def _saved_dataset_files(directory: pathlib.Path) -> list[str]:
  """The shards of a `save_to_disk` Dataset, in the order state.json lists them."""
  try:
    state = json.loads((directory / "state.json").read_text())
    names = [entry["filename"] for entry in state["_data_files"]]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ConfigError(f"{directory / 'state.json'} is not a save_to_disk state file "
                      f"({_first_line(e)})") from None
  return [str(directory / name) for name in names]


def _files_of(path: str, kind: str, train_split: str,
              validation_split: str) -> tuple[list[str], list[str] | None]:
  """(train files, validation files) one matched path stands for; validation files only where
  the path names them apart: a DatasetDict holding `validation_split`."""
  p = pathlib.Path(path)
  if p.is_file():
    return [path], None
  if kind == "parquet":
    return sorted(str(f) for f in p.rglob("*.parquet") if f.is_file()), None
  if (p / "state.json").is_file():
    return _saved_dataset_files(p), None
  if (p / "dataset_dict.json").is_file():
    try:
      splits = list(json.loads((p / "dataset_dict.json").read_text())["splits"])
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise ConfigError(f"{p / 'dataset_dict.json'} is not a save_to_disk DatasetDict file "
                        f"({_first_line(e)})") from None
    if train_split not in splits:
      raise ConfigError(f"{p} has no split train_split={train_split!r}; splits there: {splits}")
    validation = (_saved_dataset_files(p / validation_split) if validation_split in splits
                  else None)
    return _saved_dataset_files(p / train_split), validation
  raise ConfigError(f"{path} is a directory without state.json or dataset_dict.json; allowed for "
                    "arrow: Arrow files or a save_to_disk directory")


def resolve(kind: str, patterns: Sequence[str], what: str, split: str, *, dedicated: bool,
            train_split: str = "train",
            validation_split: str = "validation") -> list[tuple[str, bool]]:
  """[(file, whole)] to read for `split` ("train" or "validation"): whole files are all `split`;
  from the others the split is drawn by hash. `dedicated`: the patterns hold only this split
  (validation_paths, or paths when validation_paths is set)."""
  matches = sorted({m for p in patterns for m in glob.glob(os.path.expanduser(p), recursive=True)})
  if not matches:
    raise ConfigError(f"data {what}={tuple(patterns)} matched no files")
  out = []
  for match in matches:
    train, validation = _files_of(match, kind, train_split, validation_split)
    if split == "validation" and validation is not None:
      out.extend((f, True) for f in validation)
    else:  # all of `split` when the validation documents are elsewhere; else drawn by hash
      whole = dedicated or (split == "train" and validation is not None)
      out.extend((f, whole) for f in train)
  if not out:
    raise ConfigError(f"data {what}={tuple(patterns)} matched no {kind} files for the {split} "
                      "split")
  return out


# ---------------------------------------------------------------------------------------------
# One file's units and schema, from metadata only.


def _arrow_format(path: str) -> str:
  with open(path, "rb") as f:
    head = f.read(8)
  if head.startswith(b"ARROW1"):
    return "arrow_file"
  if head.startswith(b"FEA1"):
    raise ConfigError(f"{path} is a Feather v1 file; allowed: Arrow IPC files and streams "
                      "(Feather v2); rewrite it with pyarrow.feather.write_feather")
  return "arrow_stream"


def _stream_batches(path: str) -> tuple[pa.Schema, list[int], list[int]]:
  """(schema, byte offset of each record batch message, its rows): message headers only, the
  bodies stay in the memory map unread."""
  source = pa.memory_map(path)
  try:
    reader = ipc.MessageReader.open_stream(source)
    schema = ipc.read_schema(reader.read_next_message())
    offsets, rows = [], []
    while True:
      offset = source.tell()
      try:
        message = reader.read_next_message()
      except StopIteration:
        break
      if message.type == "dictionary batch":
        raise ConfigError(f"{path} holds dictionary-encoded columns; allowed: plain Arrow "
                          "columns (cast them with pyarrow before writing)")
      if message.type == "record batch":
        offsets.append(offset)
        rows.append(ipc.read_record_batch(message, schema).num_rows)
    return schema, offsets, rows
  finally:
    source.close()


def _file_units(path: str, kind: str) -> tuple[str, pa.Schema, list[int], list[int]]:
  """(format, schema, unit keys, unit rows). A key is a row group or batch number, or a stream
  batch's byte offset."""
  try:
    if kind == "parquet":
      with pq.ParquetFile(path) as f:
        meta = f.metadata
        rows = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        return "parquet", f.schema_arrow, list(range(len(rows))), rows
    fmt = _arrow_format(path)
    if fmt == "arrow_file":
      with pa.memory_map(path) as source:  # batches are views of the map: nothing is decoded
        reader = ipc.open_file(source)
        rows = [reader.get_batch(i).num_rows for i in range(reader.num_record_batches)]
        return fmt, reader.schema, list(range(len(rows))), rows
    return (fmt, *_stream_batches(path))
  except (pa.ArrowException, OSError) as e:
    what = "a parquet file" if kind == "parquet" else "an Arrow IPC file or stream"
    raise ConfigError(f"{path} is not {what} ({_first_line(e)})") from None


def column_kind(schema: pa.Schema, column: str, path: str) -> str:
  """'text' or 'ids' for the column (a/b reaches into struct columns); a one-line error naming
  the file and column otherwise."""
  fields, kind = schema, None
  for part in column.split("/"):
    names = [f.name for f in fields] if fields is not None else []
    if part not in names:
      raise ConfigError(f"{path} has no column {column!r}; columns there: {names}")
    kind = fields.field(part).type
    fields = kind if pa.types.is_struct(kind) else None
  if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind) \
     or pa.types.is_large_binary(kind):
    return "text"
  if (pa.types.is_list(kind) or pa.types.is_large_list(kind)
      or pa.types.is_fixed_size_list(kind)) and pa.types.is_integer(kind.value_type):
    return "ids"
  raise ConfigError(f"{path}: column {column!r} holds {kind}; allowed: text (string) or token "
                    "ids (a list of integers)")


def check(kind: str, files: Sequence[str], column: str) -> None:
  """What a source of these files would refuse, from each file's schema alone."""
  for path in files:
    try:
      if kind == "parquet":
        schema = pq.read_schema(path)
      elif _arrow_format(path) == "arrow_file":
        schema = ipc.open_file(pa.memory_map(path)).schema
      else:
        schema = ipc.open_stream(pa.memory_map(path)).schema
    except (pa.ArrowException, OSError) as e:
      what = "a parquet file" if kind == "parquet" else "an Arrow IPC file or stream"
      raise ConfigError(f"{path} is not {what} ({_first_line(e)})") from None
    column_kind(schema, column, path)


# ---------------------------------------------------------------------------------------------
# The random-access source.


def _validation_rows(name: str, start: int, stop: int, percent: int) -> np.ndarray:
  """Which of rows [start, stop) of file `name` are validation: a hash of (file name, row), so a
  document's split never depends on how the file is cut into units."""
  x = np.arange(start, stop, dtype=np.uint64) + np.uint64(zlib.crc32(name.encode()) << 32)
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)  # splitmix64's finaliser
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  x = x ^ (x >> np.uint64(31))
  return (x % np.uint64(100)) < np.uint64(percent)


class ColumnarSource:
  """Documents (text or token ids) from one column of parquet / Arrow files; see the module
  docstring. files: [(path, whole)]; a file that is not whole gives only the rows of `split`
  ("train" or "validation") under the validation_percent hash."""

  def __init__(self, kind: str, files: Sequence[tuple[str, bool]], column: str,
               split: str | None = None, validation_percent: int = 5):
    self._kind, self._column = kind, column
    self._top, *self._nested = column.split("/")
    self._split, self._percent = split, validation_percent
    self._files, self._formats, self._schemas, self._whole = [], [], [], []
    unit_file, unit_key, unit_rows, unit_start, unit_count = [], [], [], [], []
    for i, (path, whole) in enumerate(files):
      fmt, schema, keys, rows = _file_units(path, kind)
      column_kind(schema, column, path)
      self._files.append(path)
      self._formats.append(fmt)
      self._schemas.append(schema)
      self._whole.append(whole or split is None)
      start = 0
      for key, n in zip(keys, rows):
        unit_file.append(i)
        unit_key.append(key)
        unit_rows.append(n)
        unit_start.append(start)
        unit_count.append(n if self._whole[i] else int(self._selected(i, start, n).size))
        start += n
    self._unit_file = np.asarray(unit_file, np.int32)
    self._unit_key = np.asarray(unit_key, np.int64)
    self._unit_start = np.asarray(unit_start, np.int64)
    self._unit_rows = np.asarray(unit_rows, np.int64)
    self._cumulative = np.concatenate([[0], np.cumsum(unit_count, dtype=np.int64)])
    self._cache: collections.OrderedDict[int, tuple[pa.Array, np.ndarray | None]] = (
        collections.OrderedDict())
    self._lock = threading.Lock()

  def _selected(self, file: int, start: int, rows: int) -> np.ndarray:
    """Positions inside a unit of the rows that belong to this split."""
    validation = _validation_rows(pathlib.Path(self._files[file]).name, start, start + rows,
                                  self._percent)
    return np.flatnonzero(validation if self._split == "validation" else ~validation)

  def __len__(self) -> int:
    return int(self._cumulative[-1])

  @property
  def block_size(self) -> int:
    """Documents per shuffle block: SHUFFLE_UNITS units' worth."""
    units = max(1, int(np.count_nonzero(np.diff(self._cumulative))))
    return max(1, SHUFFLE_UNITS * -(-len(self) // units))

  def _read(self, unit: int) -> tuple[pa.Array, np.ndarray | None]:
    file = int(self._unit_file[unit])
    path, fmt, key = self._files[file], self._formats[file], int(self._unit_key[unit])
    try:
      if fmt == "parquet":
        with pq.ParquetFile(path) as f:
          array = f.read_row_group(key, columns=[self._top]).column(0)
      elif fmt == "arrow_file":  # the array outlives the map: it holds the mapped region
        with pa.memory_map(path) as source:
          array = ipc.open_file(source).get_batch(key).column(self._top)
      else:
        with pa.memory_map(path) as source:
          source.seek(key)
          batch = ipc.read_record_batch(ipc.read_message(source), self._schemas[file])
        array = batch.column(self._top)
    except (pa.ArrowException, OSError) as e:
      where = f"row group {key}" if fmt == "parquet" else "a record batch"
      raise ConfigError(f"{path}: {where} of column {self._column!r} cannot be read "
                        f"({_first_line(e)})") from None
    if isinstance(array, pa.ChunkedArray):
      array = array.combine_chunks()
    for part in self._nested:
      array = array.field(part)
    selected = None if self._whole[file] else self._selected(
        file, int(self._unit_start[unit]), int(self._unit_rows[unit]))
    return array, selected

  def _unit(self, unit: int) -> tuple[pa.Array, np.ndarray | None]:
    with self._lock:
      if unit in self._cache:
        self._cache.move_to_end(unit)
        return self._cache[unit]
    value = self._read(unit)  # outside the lock: reader threads decode different units at once
    with self._lock:
      self._cache[unit] = value
      while len(self._cache) > CACHED_UNITS:
        self._cache.popitem(last=False)
    return value

  def __getitem__(self, index: int) -> str | np.ndarray:
    index = int(index) % len(self)
    unit = int(np.searchsorted(self._cumulative, index, side="right")) - 1
    array, selected = self._unit(unit)
    row = index - int(self._cumulative[unit])
    value = array[int(selected[row]) if selected is not None else row]
    if pa.types.is_string(value.type) or pa.types.is_large_string(value.type):
      return value.as_py() or ""
    if pa.types.is_binary(value.type) or pa.types.is_large_binary(value.type):
      return (value.as_py() or b"").decode("utf-8", errors="replace")
    if not value.is_valid:
      return np.zeros(0, np.int32)
    if value.values.null_count:
      raise ConfigError(f"column {self._column!r} of {self._files[self._unit_file[unit]]} holds "
                        "a null token id; allowed: lists of integers without nulls")
    return value.values.to_numpy()

  def __repr__(self) -> str:
    return (f"ColumnarSource({len(self._files)} {self._kind} files, {len(self._unit_key)} units, "
            f"{len(self)} documents, column {self._column!r})")


# ---------------------------------------------------------------------------------------------
# Shuffling by blocks.


class BlockShuffleMapDataset(grain.MapDataset):
  """Blocks of `block_size` consecutive documents in a seeded random order, the documents of each
  block in a seeded random order too; both change every epoch (index // len). A reader that decodes
  whole units then decodes each about once per epoch, where a global shuffle decodes one per
  document. Pure function of the index: a grain iterator's state stays its position."""

  _MUTATES_ELEMENT_SPEC = False

  def __init__(self, parent: grain.MapDataset, *, block_size: int, seed: int):
    super().__init__(parent)
    self._length, self._block, self._seed = len(parent), max(1, int(block_size)), int(seed)
    # The orders of recent epochs and blocks (reader threads straddle at most one boundary of
    # each). grain's index_shuffle would need no memory, but costs 5 ms per index on a range of
    # 12 (50 us on 1000).
    self._orders: collections.OrderedDict[tuple, Any] = collections.OrderedDict()
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return self._length

  def __str__(self) -> str:
    return f"BlockShuffleMapDataset(block_size={self._block})"

  def _cached(self, key: tuple[int, ...], make):
    with self._lock:
      if key in self._orders:
        self._orders.move_to_end(key)
        return self._orders[key]
    value = make()
    with self._lock:
      self._orders[key] = value
      while len(self._orders) > 8:
        self._orders.popitem(last=False)
    return value

  def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(blocks in this epoch's order, where each starts in it)."""
    def make():
      blocks = np.random.default_rng([self._seed, epoch]).permutation(
          -(-self._length // self._block))
      sizes = np.minimum(self._block, self._length - blocks * self._block)
      return blocks, np.concatenate([[0], np.cumsum(sizes)])
    return self._cached((epoch,), make)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    epoch, k = divmod(int(index), self._length)
    blocks, starts = self._epoch_order(epoch)
    slot = int(np.searchsorted(starts, k, side="right")) - 1
    block, size = int(blocks[slot]), int(starts[slot + 1] - starts[slot])
    inner = self._cached((epoch, block), lambda: np.random.default_rng(
        [self._seed, epoch, block]).permutation(size))[k - int(starts[slot])]
    return self._parent[block * self._block + int(inner)]
