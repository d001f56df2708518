"""Exact import and export of Hugging Face checkpoints (`config.json` + `*.safetensors`).

The conversion is a name map plus one transform per tensor kind. A torch `Linear` stores
[out, in]; we store [in..., out...] with heads as their own axis, e.g. q_proj [D,N,H] and
o_proj [N,H,D]. Fields we cannot reproduce exactly are refused, never ignored.

A family's own tensors (a mixture's experts) and a wrapping checkpoint's (Gemma 3's vision +
text one) come from its file in families/.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any, Mapping

import jax
import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from minitron_jax import families
from minitron_jax.checkpoints import gguf_checkpoint
from minitron_jax.core import atomic, distributed
from minitron_jax.models import model as model_lib
from minitron_jax.models.config import ModelConfig
from minitron_jax.errors import ConfigError
# config.json <-> ModelConfig: hf_config.py; these names stay importable here.
from minitron_jax.checkpoints.hf_config import (_REQUIRED_FIELDS, _check_model_type,  # noqa: F401
                                    config_from_hf, config_to_hf, supported_model_types,
                                    text_config)

_DEFAULT_SHARD_BYTES = 4 * 1024**3
Layout = int | str

# Our param path -> (Hugging Face tensor name, layout). Layout "vector": HF stores it flat (biases,
# norms); "same": identical layout (the embedding); an int k: a Linear weight W [out, in] with
# ours = W.T reshaped, the first k of our axes being W's input features.
_LAYER_TENSORS: dict[tuple[str, ...], tuple[str, Layout]] = {
    ("attn_norm", "scale"): ("input_layernorm.weight", "vector"),
    ("attn_norm", "bias"): ("input_layernorm.bias", "vector"),
    ("mlp_norm", "scale"): ("post_attention_layernorm.weight", "vector"),
    ("mlp_norm", "bias"): ("post_attention_layernorm.bias", "vector"),
    ("attn", "q_proj"): ("self_attn.q_proj.weight", 1),
    ("attn", "k_proj"): ("self_attn.k_proj.weight", 1),
    ("attn", "v_proj"): ("self_attn.v_proj.weight", 1),
    ("attn", "o_proj"): ("self_attn.o_proj.weight", 2),
    ("attn", "q_bias"): ("self_attn.q_proj.bias", "vector"),
    ("attn", "k_bias"): ("self_attn.k_proj.bias", "vector"),
    ("attn", "v_bias"): ("self_attn.v_proj.bias", "vector"),
    ("attn", "o_bias"): ("self_attn.o_proj.bias", "vector"),
    ("attn", "q_norm", "scale"): ("self_attn.q_norm.weight", "vector"),
    ("attn", "k_norm", "scale"): ("self_attn.k_norm.weight", "vector"),
    ("mlp", "gate_proj"): ("mlp.gate_proj.weight", 1),
    ("mlp", "up_proj"): ("mlp.up_proj.weight", 1),
    ("mlp", "down_proj"): ("mlp.down_proj.weight", 1),
    ("mlp", "gate_bias"): ("mlp.gate_proj.bias", "vector"),
    ("mlp", "up_bias"): ("mlp.up_proj.bias", "vector"),
    ("mlp", "down_bias"): ("mlp.down_proj.bias", "vector"),
}
_TOP_TENSORS: dict[tuple[str, ...], tuple[str, Layout]] = {
    ("embed",): ("model.embed_tokens.weight", "same"),
    ("final_norm", "scale"): ("model.norm.weight", "vector"),
    ("final_norm", "bias"): ("model.norm.bias", "vector"),
    ("lm_head",): ("lm_head.weight", 1),
}
# Gemma 2/3 sandwich norms: post_attention_layernorm normalises the attention output there, so the
# MLP's pre-norm has its own name (in Gemma 1, as in Llama, post_attention_layernorm is that one).
_POST_NORM_TENSORS: dict[tuple[str, ...], tuple[str, Layout]] = {
    ("mlp_norm", "scale"): ("pre_feedforward_layernorm.weight", "vector"),
    ("attn_post_norm", "scale"): ("post_attention_layernorm.weight", "vector"),
    ("mlp_post_norm", "scale"): ("post_feedforward_layernorm.weight", "vector"),
}
# Tensors some checkpoints carry that hold nothing we compute from.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# ----------------------------------------------------------------------------- tensors


def _tensor_map(config: ModelConfig):
  """Yields (our path, abstract leaf, HF name or per-layer name template, layout) per weight."""
  flat = jax.tree_util.tree_flatten_with_path(model_lib.abstract_params(config))[0]
  layer_tensors = {**_LAYER_TENSORS, **(_POST_NORM_TENSORS if config.post_norms else {}),
                   **families.get(config.family).layer_tensors}
  for key_path, leaf in flat:
    path = tuple(k.key for k in key_path)
    if path[0] == "layers":
      name, layout = layer_tensors[path[1:]]
      yield path, leaf, "model.layers.{}." + name, layout
    else:
      name, layout = _TOP_TENSORS[path]
      yield path, leaf, name, layout


def _per_expert(layout) -> bool:
  return isinstance(layout, tuple) and layout[0] == "experts"


def _to_ours(tensor: np.ndarray, shape: tuple[int, ...], layout: Layout) -> np.ndarray:
  return tensor.reshape(shape) if isinstance(layout, str) else tensor.T.reshape(shape)


def _to_hf(array: np.ndarray, layout: Layout) -> np.ndarray:
  if layout == "same":
    return array
  if layout == "vector":
    return array.reshape(-1)
  rows = math.prod(array.shape[:layout])
  return np.ascontiguousarray(array.reshape(rows, -1).T)


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def params_from_hf(config: ModelConfig, tensors: Mapping[str, np.ndarray]) -> model_lib.Params:
  """Our params from a name -> array mapping of Hugging Face tensors."""
  dtype = jax.numpy.dtype(config.param_dtype)
  used = set()
  params: dict = {}

  def take(name: str, shape) -> np.ndarray:
    if name not in tensors:
      raise ConfigError(f"checkpoint lacks tensor {name!r} that the config requires")
    tensor = np.asarray(tensors[name])
    if math.prod(tensor.shape) != math.prod(shape):
      raise ConfigError(f"tensor {name!r} has shape {tuple(tensor.shape)}; the config needs "
                        f"{math.prod(shape)} elements")
    used.add(name)
    return tensor

  for path, leaf, name, layout in _tensor_map(config):
    if _per_expert(layout):  # [L,E,...]: one tensor per layer and expert
      per_expert = leaf.shape[2:]
      value = np.stack([np.stack([
          _to_ours(take(name.format(i, e=e), per_expert), per_expert, layout[1])
          for e in range(config.num_experts)]) for i in range(config.num_layers)])
    elif path[0] == "layers":
      per_layer = leaf.shape[1:]
      value = np.stack([_to_ours(take(name.format(i), per_layer), per_layer, layout)
                        for i in range(config.num_layers)])
    else:
      value = _to_ours(take(name, leaf.shape), leaf.shape, layout)
    _set(params, path, value.astype(dtype))

  check_all_used(config, tensors, used)
  return params


def check_all_used(config: ModelConfig, names, used: set[str]) -> None:
  """One line when the checkpoint holds tensors (`names`) the config does not describe."""
  extra = sorted(n for n in names if n not in used and not n.endswith(_IGNORED_SUFFIXES)
                 and not (config.tie_word_embeddings and n == "lm_head.weight"))
  if extra:
    raise ConfigError(f"checkpoint has {len(extra)} tensors the config does not describe, "
                      f"e.g. {extra[:3]}")


def _fold_embedding_scale(config: ModelConfig, path: tuple[str, ...], value: np.ndarray
                          ) -> np.ndarray:
  """One weight as transformers' own scale, sqrt(hidden_size), needs it to compute what ours does.

  A Gemma model pruned in width keeps the unpruned scale (see prune.py); transformers multiplies
  by sqrt of the new width. The embedding absorbs the ratio k, and with tied embeddings the LM
  head is that same matrix, so the final norm's (1 + w) is divided by k to leave logits as they
  were: exact up to float rounding.
  """
  if config.embedding_scale is None or config.embedding_scale == config.hidden_size ** 0.5:
    return value
  k = np.float64(config.embedding_scale) / np.float64(config.hidden_size ** 0.5)
  if path == ("embed",):
    return (np.asarray(value, np.float64) * k).astype(np.float32)
  if config.tie_word_embeddings and path == ("final_norm", "scale"):
    return ((1.0 + np.asarray(value, np.float64)) / k - 1.0).astype(np.float32)
  return value


def iter_params_to_hf(config: ModelConfig, params: model_lib.Params):
  """(HF name, host tensor) one weight at a time: a model sharded over devices (or processes) is
  gathered to the host leaf by leaf, never whole. Every process must iterate it (the gathers are
  collective)."""
  for path, _, name, layout in _tensor_map(config):
    value = params
    for key in path:
      value = value[key]
    value = _fold_embedding_scale(config, path, np.asarray(distributed.to_host(value)))
    if _per_expert(layout):
      for i in range(config.num_layers):
        for e in range(config.num_experts):
          yield name.format(i, e=e), _to_hf(value[i, e], layout[1])
    elif path[0] == "layers":
      for i in range(config.num_layers):
        yield name.format(i), _to_hf(value[i], layout)
    else:
      yield name, _to_hf(value, layout)


def params_to_hf(config: ModelConfig, params: model_lib.Params) -> dict[str, np.ndarray]:
  """HF tensors (float32 where a weight had to be rescaled, else the params' dtype)."""
  return dict(iter_params_to_hf(config, params))


# ----------------------------------------------------------------------------- files


def _first_line(error: BaseException) -> str:
  return (str(error).splitlines() or [type(error).__name__])[0]


def safetensors_files(directory: str | os.PathLike) -> list[pathlib.Path]:
  """The weight files of a model directory, each checked from its header alone (no tensor read).

  With a `model.safetensors.index.json` the files are its shards, every one of which must exist
  and hold the tensors the index assigns to it; without one, every `*.safetensors` file. A
  truncated or corrupt file, a missing shard or a bad index is one line naming the file.
  """
  directory = pathlib.Path(directory)
  index_file = directory / "model.safetensors.index.json"
  expected: dict[str, list[str]] = {}
  if index_file.is_file():
    try:
      weight_map = json.loads(index_file.read_text())["weight_map"]
      for name, shard in weight_map.items():
        expected.setdefault(str(shard), []).append(str(name))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
      raise ConfigError(f"{index_file} is not a valid safetensors index "
                        f"({type(e).__name__}: {_first_line(e)})") from None
    files = [directory / shard for shard in sorted(expected)]
    missing = [file.name for file in files if not file.is_file()]
    if missing:
      raise ConfigError(f"{index_file} lists {len(missing)} shard(s) missing from {directory}, "
                        f"e.g. {missing[0]}; allowed: a complete download")
  else:
    files = sorted(directory.glob("*.safetensors"))
  if not files:
    raise ConfigError(f"no *.safetensors files in {directory}")
  for file in files:
    try:
      with safetensors.safe_open(str(file), framework="numpy") as reader:
        names = set(reader.keys())
    except (safetensors.SafetensorError, OSError) as e:
      raise ConfigError(f"{file} is truncated or not a safetensors file ({_first_line(e)}); "
                        "allowed: a complete safetensors file") from None
    absent = [name for name in expected.get(file.name, ()) if name not in names]
    if absent:
      raise ConfigError(f"{file} lacks {len(absent)} tensor(s) its index assigns to it, e.g. "
                        f"{absent[0]!r}")
  return files


def read_safetensors(directory: pathlib.Path) -> dict[str, np.ndarray]:
  """Every tensor of the directory's weight files (`safetensors_files`), as host numpy arrays."""
  files = safetensors_files(directory)
  tensors = {}
  cpu = jax.local_devices(backend="cpu")[0]  # this process's own: device 0 may be another's
  # The jax reader understands bfloat16, which the numpy one does not.
  with jax.default_device(cpu):
    for file in files:
      try:
        with safetensors.safe_open(str(file), framework="flax") as reader:
          for name in reader.keys():
            tensors[name] = np.asarray(reader.get_tensor(name))
      except (safetensors.SafetensorError, OSError) as e:  # changed since it was checked
        raise ConfigError(f"{file} could not be read ({_first_line(e)})") from None
  return tensors


def read_config(path: str | os.PathLike) -> dict[str, Any]:
  """The raw `config.json` dict of a Hugging Face model directory."""
  config_file = pathlib.Path(path) / "config.json"
  if not config_file.is_file():
    raise ConfigError(f"{path} has no config.json; expected a Hugging Face model directory")
  try:
    hf = json.loads(config_file.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise ConfigError(f"{config_file} is not valid JSON ({_first_line(e)}); allowed: a "
                      "Hugging Face config.json") from None
  if not isinstance(hf, dict):
    raise ConfigError(f"{config_file} holds a JSON {type(hf).__name__}, not an object; allowed: "
                      "a Hugging Face config.json")
  # Another architecture names its fields differently (gpt2: n_layer, n_embd): say it is not one
  # we compute rather than list the fields it lacks.
  _check_model_type(text_config(hf), f"{config_file}: ")
  missing = [key for key in _REQUIRED_FIELDS if key not in text_config(hf)]
  if missing:
    raise ConfigError(f"{config_file} lacks {missing}; allowed: a config.json with "
                      f"{list(_REQUIRED_FIELDS)}")
  return hf


def load_config(path: str | os.PathLike) -> ModelConfig:
  """The architecture of a Hugging Face directory or a GGUF file, without reading any weight."""
  if gguf_checkpoint.is_gguf(path):
    return config_from_hf(gguf_checkpoint.hf_config(gguf_checkpoint.open_reader(path)))
  return config_from_hf(read_config(path))


def load(path: str | os.PathLike, *, param_dtype: str | None = None):
  """(config, params) from a Hugging Face model directory or a llama.cpp `.gguf` file (any
  tensor type the `gguf` package dequantises; params are float32 unless `param_dtype`)."""
  if gguf_checkpoint.is_gguf(path):
    reader = gguf_checkpoint.open_reader(path)
    hf_config = gguf_checkpoint.hf_config(reader)
    config = config_from_hf(hf_config)
    tensors = gguf_checkpoint.hf_tensors(reader, hf_config)
  else:
    hf_config = read_config(path)
    config = config_from_hf(hf_config)
    tensors = read_safetensors(pathlib.Path(path))
    wrapper = families.BY_WRAPPER_TYPE.get(hf_config.get("model_type"))
    if wrapper is not None:
      tensors = wrapper.unwrap_tensors(tensors, path)
  if param_dtype is not None:
    config = config.replace(param_dtype=param_dtype)
  return config, params_from_hf(config, tensors)


def save(path: str | os.PathLike, config: ModelConfig, params: model_lib.Params, *,
         dtype: str = "float32", max_shard_bytes: int = _DEFAULT_SHARD_BYTES,
         tokenizer=None) -> None:
  """Writes config.json and safetensors shards that `transformers` loads; atomic per directory.

  tokenizer (one of minitron_jax.inputs.tokenizer's, or anything with `save_pretrained(directory,
  model_max_length)` and `eos_id` / `bos_id`): its files and a generation_config.json with its
  special ids are written too, so the directory is a whole model that AutoTokenizer, lm-eval's
  hf backend and vLLM take as it is. Without one, only the weights and config.json.

  Streams: weights are gathered to the host one at a time and each shard is written as soon as
  it is full, so a sharded model never sits whole on one device or host. Every process calls
  it; the primary one writes."""
  if dtype not in ("float32", "bfloat16"):
    raise ConfigError(f"dtype={dtype!r} is not supported; allowed: float32, bfloat16")
  np_dtype = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
  hf_config = config_to_hf(config, dtype)
  tensors = ((name, tensor.astype(np_dtype)) for name, tensor in iter_params_to_hf(config, params))
  if distributed.is_primary():
    _write(path, tensors, hf_config, max_shard_bytes, tokenizer, config.max_position_embeddings)
  else:
    for _ in tensors:  # the gathers are collective: take part, write nothing
      pass
  distributed.barrier(f"exported {path}")


def generation_config(tokenizer) -> dict:
  """generation_config.json: the tokenizer's eos / bos ids (the eos pads: a batch's padding is
  masked, and a byte tokenizer has neither)."""
  eos, bos = tokenizer.eos_id, getattr(tokenizer, "bos_id", None)
  ids = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": eos}
  return {k: v for k, v in ids.items() if v is not None}


def _write(path, tensors, hf_config, max_shard_bytes, tokenizer, context: int) -> None:
  with atomic.directory(path, collective=False) as staging:
    if tokenizer is not None:
      tokenizer.save_pretrained(staging, model_max_length=context)
      (staging / "generation_config.json").write_text(
          json.dumps(generation_config(tokenizer), indent=2, sort_keys=True))
    shards: list[list[str]] = []  # tensor names per written shard
    shard: dict[str, np.ndarray] = {}
    total, size = 0, 0

    def flush():
      safetensors.numpy.save_file(shard, str(staging / f"part-{len(shards)}.safetensors"),
                                  metadata={"format": "pt"})
      shards.append(list(shard))
      shard.clear()

    for name, tensor in tensors:
      if shard and size + tensor.nbytes > max_shard_bytes:
        flush()
        size = 0
      shard[name] = tensor
      size += tensor.nbytes
      total += tensor.nbytes
    flush()
    if len(shards) == 1:
      (staging / "part-0.safetensors").rename(staging / "model.safetensors")
    else:
      weight_map = {}
      for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        (staging / f"part-{i}.safetensors").rename(staging / file)
        weight_map.update({name: file for name in names})
      index = {"metadata": {"total_size": total}, "weight_map": weight_map}
      (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (staging / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True))
    for file in staging.iterdir():
      file.chmod(0o644)
