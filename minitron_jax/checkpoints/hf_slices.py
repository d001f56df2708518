"""A checkpoint read straight into sharded params, each process reading only what its own
devices hold, so that no process ever holds the whole model.

A Hugging Face directory is read by slices (safetensors `get_slice`), in the file's dtype, each
slice going to its device as it is read: no float32 copy exists on the host, the cast to the
params' dtype happens on the devices. A GGUF file stays memory-mapped; a quantised tensor can
only be dequantised whole, so each weight is dequantised (float32) when its leaf is placed and
dropped after: a host holds at most one leaf's tensors, never the model.

The params equal `hf.load`'s (the same name map and layouts, hf.py); a wrapping multimodal
checkpoint, which needs more than renaming and reshaping on the way in, is read whole by
`hf.load` and then placed.
"""

from __future__ import annotations

import math
import os
import pathlib
from typing import Callable

import jax
import numpy as np
import safetensors

from minitron_jax import families
from minitron_jax.checkpoints import gguf_checkpoint, hf
from minitron_jax.core import distributed
from minitron_jax.errors import ConfigError
from minitron_jax.models import model as model_lib
from minitron_jax.models import sharding as sharding_lib
from minitron_jax.models.config import ModelConfig


def can_read_slices(path: str | os.PathLike) -> bool:
  """Whether `load` reads this checkpoint by parts (else it reads it whole, then places it)."""
  if gguf_checkpoint.is_gguf(path):
    return True
  return families.BY_WRAPPER_TYPE.get(hf.read_config(path).get("model_type")) is None


def stored_dtype(path: str | os.PathLike) -> str:
  """The params dtype that holds a checkpoint's weights exactly: "bfloat16" when every floating
  tensor of a Hugging Face directory is stored in bfloat16, else "float32" (float16 widens to it
  exactly; a GGUF file's weights are dequantised to it). Read from the headers alone."""
  if gguf_checkpoint.is_gguf(path):
    return "float32"
  kinds = set()
  for file in hf.safetensors_files(path):
    with safetensors.safe_open(str(file), framework="numpy") as reader:
      kinds.update(reader.get_slice(name).get_dtype() for name in reader.keys())
  floating = kinds & {"F64", "F32", "F16", "BF16"}
  return "bfloat16" if floating == {"BF16"} else "float32"


def load(path: str | os.PathLike, shardings, *, param_dtype: str | None = None,
         on_read: Callable[[str, tuple[slice, ...], int], None] | None = None):
  """(config, params placed with `shardings`, a tree like the params) from a Hugging Face
  directory, each process reading only its devices' slices. `on_read(name, box, bytes)` is told
  of every slice read (tests count the bytes)."""
  if not can_read_slices(path):
    config, params = hf.load(path, param_dtype=param_dtype)
    return config, jax.tree.map(distributed.put, params, shardings)
  if gguf_checkpoint.is_gguf(path):
    reader = gguf_checkpoint.open_reader(path)
    hf_config = gguf_checkpoint.hf_config(reader)
    files = _GGUFTensors(reader, hf_config)
  else:
    hf_config = hf.read_config(path)
    files = _Files(pathlib.Path(path))
  config = hf.config_from_hf(hf_config)
  if param_dtype is not None:
    config = config.replace(param_dtype=param_dtype)
  with files:
    params = _read(config, files, shardings, on_read)
  files.check_all_used(config)
  return config, params


class _Files:
  """The directory's safetensors files and which tensor lives where, each file opened for one
  tensor's read and closed after it.

  A reader memory-maps its whole file, and the pages a slice touches stay in the process's RSS
  while the map lives; a slice along a Linear's input axis (what FSDP splits) touches every page
  of the tensor. Kept open for the whole read, the readers held every touched page of the
  checkpoint at once (2.4 GB for a bf16 Llama-3.2-1B on each process); opened per tensor, at
  most one tensor's pages are mapped.
  """

  def __init__(self, directory: pathlib.Path):
    self.directory = directory
    self.where: dict[str, pathlib.Path] = {}
    self.used: set[str] = set()

  def __enter__(self) -> "_Files":
    for file in hf.safetensors_files(self.directory):  # every header checked
      with safetensors.safe_open(str(file), framework="numpy") as reader:
        for name in reader.keys():
          self.where[name] = file
    return self

  def __exit__(self, *exc) -> None:
    pass

  def tensor(self, name: str, elements: int):
    """The slice handle of tensor `name`, checked to hold `elements` values; its file stays
    mapped while the handle lives."""
    if name not in self.where:
      raise ConfigError(f"checkpoint lacks tensor {name!r} that the config requires")
    handle = safetensors.safe_open(str(self.where[name]), framework="flax").get_slice(name)
    shape = tuple(handle.get_shape())
    if math.prod(shape) != elements:
      raise ConfigError(f"tensor {name!r} has shape {shape}; the config needs {elements} "
                        "elements")
    self.used.add(name)
    return handle, shape

  def leaf_done(self) -> None:
    """Nothing is kept between leaves: slices are read as they are asked for."""

  def check_all_used(self, config: ModelConfig) -> None:
    hf.check_all_used(config, self.where, self.used)


class _GGUFTensors(_Files):
  """A GGUF file's weights (memory-mapped), each dequantised when first asked for and dropped
  once its leaf is placed."""

  def __init__(self, reader, hf_config: dict):
    self.hf_config = hf_config
    self.file = {name: tensor for name, tensor in gguf_checkpoint.weights(reader, hf_config)}
    self.where = dict.fromkeys(self.file)
    self.used: set[str] = set()
    self.dequantized: dict[str, np.ndarray] = {}

  def __enter__(self) -> "_GGUFTensors":
    return self

  def __exit__(self, *exc) -> None:
    self.dequantized.clear()

  def tensor(self, name: str, elements: int):
    if name not in self.file:
      raise ConfigError(f"checkpoint lacks tensor {name!r} that the config requires")
    if name not in self.dequantized:
      value = gguf_checkpoint.dequantized(self.file[name], name, self.hf_config)
      if value.size != elements:
        raise ConfigError(f"tensor {name!r} has shape {value.shape}; the config needs "
                          f"{elements} elements")
      self.dequantized[name] = value
    self.used.add(name)
    return self.dequantized[name], self.dequantized[name].shape

  def leaf_done(self) -> None:
    self.dequantized.clear()


def _read(config: ModelConfig, files: _Files, shardings, on_read) -> model_lib.Params:
  flat_shardings = {tuple(k.key for k in path): s for path, s in
                    jax.tree_util.tree_flatten_with_path(shardings)[0]}
  dtype = jax.numpy.dtype(config.param_dtype)
  params: dict = {}
  cpu = jax.local_devices(backend="cpu")[0]  # this process's own: the flax reader makes arrays
  for path, leaf, name, layout in hf._tensor_map(config):  # pylint: disable=protected-access
    sharding = flat_shardings[path]
    # How many leading axes index separate tensors: layers, and experts within them.
    stacked = 2 if hf._per_expert(layout) else 1 if path[0] == "layers" else 0  # pylint: disable=protected-access
    tensor_layout = layout[1] if stacked == 2 else layout
    per_tensor = leaf.shape[stacked:]

    def handle(*which):  # opened for one piece and dropped with it (see _Files)
      tensor_name = (name.format(which[0], e=which[1]) if stacked == 2
                     else name.format(which[0]) if stacked else name)
      return files.tensor(tensor_name, math.prod(per_tensor))

    def callback(index: tuple[slice, ...]) -> np.ndarray:
      index = tuple(_bounds(s, n) for s, n in zip(index, leaf.shape))
      outer = [range(s.start, s.stop) for s in index[:stacked]]
      box = index[stacked:]
      pieces = []
      for which in (np.ndindex(*[len(r) for r in outer]) if stacked else [()]):
        chosen = tuple(r[i] for r, i in zip(outer, which))
        tensor_handle, shape = handle(*chosen)
        with jax.default_device(cpu):
          piece = _box(tensor_handle, shape, tensor_layout, per_tensor, box)
        del tensor_handle  # unmaps the file's pages this piece touched
        if on_read is not None:
          on_read(str(chosen), box, piece.nbytes)
        pieces.append(piece)
      if not stacked:
        return pieces[0]
      return np.stack(pieces).reshape(*[len(r) for r in outer], *pieces[0].shape)

    # The file's dtype on the way (placed a slice at a time), the params' dtype on the devices.
    placed = jax.make_array_from_callback(leaf.shape, sharding, callback)
    files.leaf_done()
    placed = sharding_lib.cast(placed, dtype)
    hf._set(params, path, placed)  # pylint: disable=protected-access
  return params


def _bounds(s: slice, size: int) -> slice:
  start, stop, step = s.indices(size)
  assert step == 1, s
  return slice(start, stop)


def _flat_indices(box: tuple[slice, ...], shape: tuple[int, ...]) -> np.ndarray:
  """The row-major flat indices in `shape` of every element of `box`, in the box's order."""
  if not box:
    return np.zeros(1, np.int64)
  grids = np.meshgrid(*[np.arange(s.start, s.stop) for s in box], indexing="ij")
  return np.ravel_multi_index(tuple(grids), shape).ravel()


def _box(handle, shape: tuple[int, ...], layout, ours: tuple[int, ...],
         box: tuple[slice, ...]) -> np.ndarray:
  """ours[box] of one tensor (our per-tensor shape `ours`), reading only the covering slice of
  the stored tensor (shape `shape`, hf.py's `layout`)."""
  box_shape = tuple(s.stop - s.start for s in box)
  if layout == "same" and tuple(shape) == tuple(ours):
    return np.asarray(handle[box])
  if isinstance(layout, str):  # stored flat (or as another shape), ours its row-major reshape
    flat = _flat_indices(box, ours)
    lo, hi = int(flat.min()), int(flat.max()) + 1
    covering = (np.asarray(handle[lo:hi]) if len(shape) == 1
                else np.asarray(handle[:]).reshape(-1)[lo:hi])
    return covering[flat - lo].reshape(box_shape)
  # A Linear W [out, in]: ours[in..., out...] = W[flat(out), flat(in)].
  cols = _flat_indices(box[:layout], ours[:layout])
  rows = _flat_indices(box[layout:], ours[layout:])
  r0, r1, c0, c1 = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
  block = np.asarray(handle[r0:r1, c0:c1])
  if (r1 - r0, c1 - c0) != (rows.size, cols.size):  # the box is not one contiguous block
    block = block[np.ix_(rows - r0, cols - c0)]
  return block.T.reshape(box_shape)
