"""The embedded default corpus: the Python standard library's own source, present on every machine.

Until a tokenizer is trained (distillation issue), text is read as UTF-8 bytes, so any model with
`vocab_size >= 256` can score it.
"""

from __future__ import annotations

import pathlib
import sysconfig
import zlib

import numpy as np

BYTE_VOCAB = 256


def stdlib_files() -> list[pathlib.Path]:
  """Top-level `*.py` files of this interpreter's standard library, in a stable order."""
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  return sorted(root.glob("*.py"))


def split_of(path: pathlib.Path, validation_percent: int = 5) -> str:
  """'train' or 'validation', decided by a hash of the file name so the split never moves."""
  return "validation" if zlib.crc32(path.name.encode()) % 100 < validation_percent else "train"


def stdlib_bytes(split: str = "train") -> np.ndarray:
  """The split's files concatenated as one uint8 array."""
  parts = [f.read_bytes() for f in stdlib_files() if split_of(f) == split]
  if not parts:
    raise FileNotFoundError("no standard library source found under "
                            f"{sysconfig.get_paths()['stdlib']}")
  return np.frombuffer(b"\n".join(parts), dtype=np.uint8)


def byte_windows(data: np.ndarray, batch_size: int, seq_len: int, num_batches: int,
                 seed: int = 0) -> np.ndarray:
  """[num_batches, batch_size, seq_len] int32 windows at seeded random offsets."""
  if len(data) <= seq_len:
    raise ValueError(f"corpus of {len(data)} tokens is shorter than seq_len={seq_len}")
  starts = np.random.default_rng(seed).integers(0, len(data) - seq_len,
                                                size=(num_batches, batch_size))
  return data[starts[..., None] + np.arange(seq_len)].astype(np.int32)

