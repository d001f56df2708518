"""Documents from local text files (one per file) and JSON-lines files (one per line).

The index (file, byte offset) is built once and documents are read on access, so a large corpus
never sits in memory. `nested_field` also serves TFDS records and evaluation tasks.
"""

from __future__ import annotations

import glob
import json
import os
import pathlib
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from minitron_jax.errors import ConfigError


def split_of_key(key: str, validation_percent: int) -> str:
  """The same rule as corpus.split_of, on any string key."""
  return "validation" if zlib.crc32(key.encode()) % 100 < validation_percent else "train"


def nested_field(record: Any, field: str, where: str, what: str | None = None) -> Any:
  """record[a][b] for field "a/b", with a one-line error naming `what` (default: the field) and
  the fields there are."""
  value = record
  for part in field.split("/"):
    if not isinstance(value, Mapping) or part not in value:
      keys = sorted(value) if isinstance(value, Mapping) else type(value).__name__
      raise ConfigError(f"{what or f'field {field!r}'} is not in {where}; fields there: {keys}")
    value = value[part]
  return value


def as_text(value: Any) -> str:
  if isinstance(value, np.ndarray) and value.ndim == 0:
    value = value.item()
  if isinstance(value, (bytes, np.bytes_)):
    return bytes(value).decode("utf-8", errors="replace")
  if isinstance(value, str):
    return value
  raise ConfigError(f"the text field holds {type(value).__name__}, not text")


class LocalTextSource:
  """Documents from local files: a text file per document, or a JSON-lines line per document.

  The index (file, byte offset) is built once; documents are read on access, so a large corpus
  never sits in memory. Implements grain's RandomAccessDataSource protocol (__len__, __getitem__).
  """

  def __init__(self, files: Sequence[str], kind: str, text_field: str = "text",
               split: str | None = None, validation_percent: int = 5):
    self._files = [str(f) for f in files]
    self._kind = kind
    self._text_field = text_field
    file_index, offsets = [], []
    for i, path in enumerate(self._files):
      name = pathlib.Path(path).name
      if kind == "text":
        if split is None or split_of_key(name, validation_percent) == split:
          file_index.append(i)
          offsets.append(-1)
        continue
      with open(path, "rb") as f:
        offset = 0
        for line_number, line in enumerate(f, 1):
          if line.strip() and (split is None or split_of_key(
              f"{name}:{line_number}", validation_percent) == split):
            file_index.append(i)
            offsets.append(offset)
          offset += len(line)
    self._file_index = np.asarray(file_index, dtype=np.int32)
    self._offsets = np.asarray(offsets, dtype=np.int64)

  def __len__(self) -> int:
    return len(self._offsets)

  def __getitem__(self, index: int) -> str:
    path = self._files[self._file_index[index]]
    offset = int(self._offsets[index])
    if offset < 0:
      return pathlib.Path(path).read_bytes().decode("utf-8", errors="replace")
    with open(path, "rb") as f:
      f.seek(offset)
      line = f.readline()
    where = f"{path} at byte {offset}"
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ConfigError(f"{where} is not a JSON line: {e.msg}") from None
    return as_text(nested_field(record, self._text_field, where,
                                       f"text_field={self._text_field!r}"))

  def __repr__(self) -> str:
    return f"LocalTextSource({len(self._files)} {self._kind} files, {len(self)} documents)"


def expand_globs(patterns: Sequence[str], what: str) -> list[str]:
  files = sorted({f for p in patterns for f in glob.glob(os.path.expanduser(p), recursive=True)
                  if os.path.isfile(f)})
  if not files:
    raise ConfigError(f"data {what}={tuple(patterns)} matched no files")
  return files

