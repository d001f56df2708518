"""Exact import and export of Hugging Face checkpoints (`config.json` + `*.safetensors`).

The conversion is a name map plus one transform per tensor kind. A torch `Linear` stores
[out, in]; we store [in..., out...] with heads as their own axis, e.g. q_proj [D,N,H] and
o_proj [N,H,D]. Fields we cannot reproduce exactly are refused, never ignored.
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

from minitron_jax import atomic, distributed, gguf_checkpoint
from minitron_jax import model as model_lib
from minitron_jax.config import ACTIVATIONS, ConfigError, ModelConfig, RopeScaling

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "nemotron": "NemotronForCausalLM",
}
_CARRIED_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")
_REQUIRED_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "intermediate_size")
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
# Tensors some checkpoints carry that hold nothing we compute from.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# ----------------------------------------------------------------------------- config


def _rope_from_hf(hf: Mapping[str, Any], family: str) -> tuple[float, RopeScaling | None, float]:
  params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  if params and all(isinstance(v, Mapping) for v in params.values()):
    raise ConfigError(f"per-layer-type rope_parameters {sorted(params)} are not supported; "
                      "allowed: one rope setting for every layer")
  theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
  default_partial = 0.5 if family == "nemotron" else 1.0
  partial = float(params.get("partial_rotary_factor",
                             hf.get("partial_rotary_factor", default_partial)))
  kind = params.get("rope_type", params.get("type", "default"))
  if kind == "default":
    return theta, None, partial
  if kind == "linear":
    return theta, RopeScaling("linear", float(params["factor"])), partial
  if kind == "llama3":
    return theta, RopeScaling(
        "llama3", float(params["factor"]), float(params["low_freq_factor"]),
        float(params["high_freq_factor"]),
        int(params.get("original_max_position_embeddings", hf.get("max_position_embeddings")))
    ), partial
  raise ConfigError(f"rope_type={kind!r} is not supported; allowed: default, linear, llama3")


def _sliding_from_hf(hf: Mapping[str, Any], family: str, num_layers: int):
  if family == "mistral":
    return hf.get("sliding_window"), None
  if family in ("qwen2", "qwen3"):
    window = hf.get("sliding_window") if hf.get("use_sliding_window", False) else None
    if window is None:
      return None, None
    layer_types = hf.get("layer_types") or [
        "sliding_attention" if i >= hf.get("max_window_layers", 28) else "full_attention"
        for i in range(num_layers)]
    unknown = set(layer_types) - {"sliding_attention", "full_attention"}
    if unknown:
      raise ConfigError(f"layer_types {sorted(unknown)} are not supported; "
                        "allowed: sliding_attention, full_attention")
    return window, tuple(t == "sliding_attention" for t in layer_types)
  if hf.get("sliding_window"):
    raise ConfigError(f"sliding_window={hf['sliding_window']} is not supported for {family}")
  return None, None


def config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
  """A ModelConfig from a Hugging Face `config.json` dict; refuses what we cannot compute exactly."""
  family = hf.get("model_type")
  if family not in _ARCHITECTURES:
    raise ConfigError(f"model_type={family!r} is not supported; allowed: {sorted(_ARCHITECTURES)}")
  activation = hf.get("hidden_act", "relu2" if family == "nemotron" else "silu")
  if activation not in ACTIVATIONS:
    raise ConfigError(f"hidden_act={activation!r} is not supported; allowed: {ACTIVATIONS}")
  heads = hf["num_attention_heads"]
  num_layers = hf["num_hidden_layers"]
  theta, scaling, partial = _rope_from_hf(hf, family)
  window, window_layers = _sliding_from_hf(hf, family, num_layers)
  attention_bias = bool(hf.get("attention_bias", False))
  default_head_dim = 128 if family == "qwen3" else hf["hidden_size"] // heads
  return ModelConfig(
      family=family,
      vocab_size=hf["vocab_size"],
      hidden_size=hf["hidden_size"],
      num_layers=num_layers,
      num_attention_heads=heads,
      num_key_value_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or default_head_dim,
      intermediate_size=hf["intermediate_size"],
      activation=activation,
      gated_mlp=family != "nemotron",
      norm="layernorm1p" if family == "nemotron" else "rms",
      norm_eps=float(hf.get("norm_eps" if family == "nemotron" else "rms_norm_eps",
                            1e-5 if family == "nemotron" else 1e-6)),
      qkv_bias=True if family == "qwen2" else attention_bias,
      o_bias=False if family == "qwen2" else attention_bias,
      mlp_bias=bool(hf.get("mlp_bias", False)),
      qk_norm=family == "qwen3",
      rope_theta=theta,
      rope_scaling=scaling,
      partial_rotary_factor=partial,
      sliding_window=window,
      sliding_window_layers=window_layers,
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      max_position_embeddings=hf.get("max_position_embeddings", 8192),
      hf_extras=tuple((k, tuple(v) if isinstance(v, list) else v)
                      for k, v in hf.items() if k in _CARRIED_FIELDS and v is not None),
  )


def config_to_hf(config: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
  """The `config.json` dict that makes `transformers` compute exactly what our model computes."""
  family = config.family

  def refuse_unless(ok: bool, what: str):
    if not ok:
      raise ConfigError(f"{what} cannot be expressed as a Hugging Face {family} config")

  uniform_bias = config.qkv_bias == config.o_bias
  refuse_unless(config.gated_mlp == (family != "nemotron"), f"gated_mlp={config.gated_mlp}")
  refuse_unless(config.norm == ("layernorm1p" if family == "nemotron" else "rms"),
                f"norm={config.norm!r}")
  refuse_unless(config.qk_norm == (family == "qwen3"), f"qk_norm={config.qk_norm}")
  refuse_unless(family == "nemotron" or config.partial_rotary_factor == 1.0,
                f"partial_rotary_factor={config.partial_rotary_factor}")
  if family == "qwen2":
    refuse_unless(config.qkv_bias and not config.o_bias and not config.mlp_bias,
                  f"qkv_bias={config.qkv_bias}, o_bias={config.o_bias}, mlp_bias={config.mlp_bias}")
  elif family in ("mistral",):
    refuse_unless(not (config.qkv_bias or config.o_bias or config.mlp_bias), "biases")
  else:
    refuse_unless(uniform_bias, f"qkv_bias={config.qkv_bias} with o_bias={config.o_bias}")
  refuse_unless(family in ("llama", "nemotron") or not config.mlp_bias,
                f"mlp_bias={config.mlp_bias}")
  refuse_unless(family in ("mistral", "qwen2", "qwen3") or config.sliding_window is None,
                f"sliding_window={config.sliding_window}")
  refuse_unless(family != "mistral" or config.sliding_window_layers is None,
                "per-layer sliding windows")

  rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
  legacy_scaling = None
  if config.rope_scaling is not None:
    s = config.rope_scaling
    rope.update(rope_type=s.kind, factor=s.factor)
    if s.kind == "llama3":
      rope.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                  original_max_position_embeddings=s.original_max_position_embeddings)
    legacy_scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
  if family == "nemotron":
    rope["partial_rotary_factor"] = config.partial_rotary_factor

  hf: dict[str, Any] = dict(
      architectures=[_ARCHITECTURES[family]],
      model_type=family,
      vocab_size=config.vocab_size,
      hidden_size=config.hidden_size,
      intermediate_size=config.intermediate_size,
      num_hidden_layers=config.num_layers,
      num_attention_heads=config.num_attention_heads,
      num_key_value_heads=config.num_key_value_heads,
      head_dim=config.head_dim,
      hidden_act=config.activation,
      max_position_embeddings=config.max_position_embeddings,
      tie_word_embeddings=config.tie_word_embeddings,
      rope_theta=config.rope_theta,
      rope_parameters=rope,
      dtype=dtype,
  )
  if legacy_scaling is not None:
    hf["rope_scaling"] = legacy_scaling
  if family == "nemotron":
    hf.update(norm_eps=config.norm_eps, partial_rotary_factor=config.partial_rotary_factor,
              attention_bias=config.qkv_bias, mlp_bias=config.mlp_bias)
  else:
    hf["rms_norm_eps"] = config.norm_eps
  if family in ("llama", "qwen3"):
    hf["attention_bias"] = config.qkv_bias
  if family == "llama":
    hf["mlp_bias"] = config.mlp_bias
  if family == "mistral":
    hf["sliding_window"] = config.sliding_window
  if family in ("qwen2", "qwen3"):
    hf.update(use_sliding_window=config.sliding_window is not None,
              sliding_window=config.sliding_window,
              max_window_layers=config.num_layers,
              layer_types=["sliding_attention" if w is not None else "full_attention"
                           for w in config.layer_windows()])
  hf.update({k: list(v) if isinstance(v, tuple) else v for k, v in config.hf_extras})
  return hf


# ----------------------------------------------------------------------------- tensors


def _tensor_map(config: ModelConfig):
  """Yields (our path, abstract leaf, HF name or per-layer name template, layout) per weight."""
  flat = jax.tree_util.tree_flatten_with_path(model_lib.abstract_params(config))[0]
  for key_path, leaf in flat:
    path = tuple(k.key for k in key_path)
    if path[0] == "layers":
      name, layout = _LAYER_TENSORS[path[1:]]
      yield path, leaf, "model.layers.{}." + name, layout
    else:
      name, layout = _TOP_TENSORS[path]
      yield path, leaf, name, layout


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
    if path[0] == "layers":
      per_layer = leaf.shape[1:]
      value = np.stack([_to_ours(take(name.format(i), per_layer), per_layer, layout)
                        for i in range(config.num_layers)])
    else:
      value = _to_ours(take(name, leaf.shape), leaf.shape, layout)
    _set(params, path, value.astype(dtype))

  extra = sorted(n for n in tensors if n not in used and not n.endswith(_IGNORED_SUFFIXES)
                 and not (config.tie_word_embeddings and n == "lm_head.weight"))
  if extra:
    raise ConfigError(f"checkpoint has {len(extra)} tensors the config does not describe, "
                      f"e.g. {extra[:3]}")
  return params


def params_to_hf(config: ModelConfig, params: model_lib.Params) -> dict[str, np.ndarray]:
  tensors = {}
  for path, _, name, layout in _tensor_map(config):
    value = params
    for key in path:
      value = value[key]
    value = np.asarray(value)
    if path[0] == "layers":
      for i in range(config.num_layers):
        tensors[name.format(i)] = _to_hf(value[i], layout)
    else:
      tensors[name] = _to_hf(value, layout)
  return tensors


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
  missing = [key for key in _REQUIRED_FIELDS if key not in hf]
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
    config = config_from_hf(read_config(path))
    tensors = read_safetensors(pathlib.Path(path))
  if param_dtype is not None:
    config = config.replace(param_dtype=param_dtype)
  return config, params_from_hf(config, tensors)


def save(path: str | os.PathLike, config: ModelConfig, params: model_lib.Params, *,
         dtype: str = "float32", max_shard_bytes: int = _DEFAULT_SHARD_BYTES) -> None:
  """Writes config.json and safetensors shards that `transformers` loads; atomic per directory."""
  if dtype not in ("float32", "bfloat16"):
    raise ConfigError(f"dtype={dtype!r} is not supported; allowed: float32, bfloat16")
  np_dtype = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
  hf_config = config_to_hf(config, dtype)
  tensors = {k: v.astype(np_dtype) for k, v in params_to_hf(config, params).items()}

  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, tensor in tensors.items():
    if shards[-1] and size + tensor.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = tensor
    size += tensor.nbytes

  if distributed.is_primary():
    _write(path, shards, tensors, hf_config)
  distributed.barrier(f"exported {path}")


def _write(path, shards, tensors, hf_config) -> None:
  with atomic.directory(path, collective=False) as staging:
    if len(shards) == 1:
      safetensors.numpy.save_file(shards[0], str(staging / "model.safetensors"),
                                  metadata={"format": "pt"})
    else:
      weight_map = {}
      for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        safetensors.numpy.save_file(shard, str(staging / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
      index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
               "weight_map": weight_map}
      (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (staging / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True))
    for file in staging.iterdir():
      file.chmod(0o644)
