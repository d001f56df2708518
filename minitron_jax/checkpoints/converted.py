"""The original model read once: the first stage that needs a Hugging Face directory or GGUF file
saves it as a model of our own (orbax, sharded, in the dtype that holds the checkpoint's weights
exactly: bfloat16 stays bfloat16), and every later stage restores that straight onto the mesh,
each process reading only its own shards.

The copy carries the fingerprint of the files it came from (names, sizes, modification times, and
the copy's dtype): a changed checkpoint, or another one under the same work directory, is
converted again, never silently reused.
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from typing import Any, Callable

from minitron_jax.checkpoints import checkpoint, gguf_checkpoint, hf, hf_slices
from minitron_jax.models.config import ModelConfig

SOURCE_FILE = "source.json"
_VERSION = 1  # bumped when the copy's layout changes: an older copy is converted again


def fingerprint(path: str | os.PathLike) -> dict[str, Any]:
  """What identifies the checkpoint's contents without reading them: each file's name, size and
  modification time, and the dtype its copy is kept in."""
  path = pathlib.Path(path).absolute()
  if gguf_checkpoint.is_gguf(path):
    files = [path]
  else:
    files = [path / "config.json", *hf.safetensors_files(path)]
    index = path / "model.safetensors.index.json"
    files += [index] if index.is_file() else []
  stats = [[file.name, file.stat().st_size, file.stat().st_mtime_ns] for file in files]
  return {"version": _VERSION, "path": str(path), "files": stats,
          "param_dtype": hf_slices.stored_dtype(path)}


def is_current(directory: pathlib.Path, path: str | os.PathLike,
               source: dict[str, Any] | None = None) -> bool:
  """Whether `directory` holds the copy of the checkpoint at `path` as it is now (`source`: its
  fingerprint, when already taken)."""
  saved = pathlib.Path(directory) / SOURCE_FILE
  if not checkpoint.is_saved_model(directory) or not saved.is_file():
    return False
  try:
    return json.loads(saved.read_text()) == (source or fingerprint(path))
  except ValueError:  # a damaged fingerprint: convert again
    return False


def load(path: str | os.PathLike, directory: pathlib.Path,
         shardings: Callable[[ModelConfig], Any], log: Callable[[str], None] = print):
  """(config, params placed with `shardings(config)`) of the checkpoint at `path`, in the dtype
  that holds its weights exactly: restored from its copy in `directory`, converted first when
  there is none or the checkpoint changed since."""
  directory = pathlib.Path(directory)
  source = fingerprint(path)
  if is_current(directory, path, source):
    config = checkpoint.load_config(directory)
    return checkpoint.load_model(directory, shardings(config))
  started = time.perf_counter()
  dtype = source["param_dtype"]
  config = hf.load_config(path).replace(param_dtype=dtype)
  config, params = hf_slices.load(path, shardings(config), param_dtype=dtype)
  checkpoint.save_model(directory, config, params,
                        extra_files={SOURCE_FILE: json.dumps(source, indent=2)})
  log(f"[model] {path} converted once, in {dtype}, to {directory} "
      f"({time.perf_counter() - started:.1f}s); later stages restore it onto the mesh")
  return config, params
