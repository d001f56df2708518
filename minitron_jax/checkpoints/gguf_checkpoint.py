"""A llama.cpp GGUF checkpoint read as a Hugging Face one: its config dict and HF-named tensors.

`hf.load` turns both into our config and params through the same checks as a safetensors
directory, so this module only translates: GGUF metadata keys -> `config.json` fields, GGUF tensor
names -> HF names, any tensor type the `gguf` package can dequantise -> float32, and llama.cpp's
row permutation of Q/K (its RoPE pairs dims (2i, 2i+1), HF's pairs (i, i + d/2)) undone.
"""

from __future__ import annotations

import functools
import os
import pathlib
from typing import Any

import numpy as np

from minitron_jax import families
from minitron_jax.errors import ConfigError

SUFFIX = ".gguf"
# GGUF general.architecture -> the families whose files carry it (each family's file says).
ARCHITECTURES: dict[str, tuple[families.Family, ...]] = {}
for _family in families.ALL.values():
  if _family.gguf_architecture:
    ARCHITECTURES[_family.gguf_architecture] = (
        *ARCHITECTURES.get(_family.gguf_architecture, ()), _family)

_TOP_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# Llama 3.x GGUFs carry their RoPE scaling as per-frequency divisors instead of metadata.
_ROPE_FREQS = "rope_freqs.weight"


def is_gguf(path: str | os.PathLike) -> bool:
  return str(path).endswith(SUFFIX)


def open_reader(path: str | os.PathLike):
  """A memory-mapped reader (metadata parsed, tensors mapped, not read); one line for a bad file.

  Readers are cached per file version: validation, the tokenizer and the stages each open the
  same file, and parsing a 49k-token vocabulary takes seconds.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise ConfigError(f"GGUF file {str(path)!r} does not exist")
  stat = path.stat()
  return _cached_reader(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _cached_reader(path: str, mtime_ns: int, size: int):
  del mtime_ns, size  # part of the cache key only
  import gguf  # the only module that needs the package

  try:
    return gguf.GGUFReader(path)
  except Exception as error:  # gguf raises ValueError/struct.error/IndexError for bad bytes
    detail = str(error).splitlines()[0] if str(error) else type(error).__name__
    raise ConfigError(f"{path} is not a readable GGUF file: {detail}") from None


def field(reader, key: str, default: Any = None) -> Any:
  """One metadata value as a Python scalar, string or list."""
  entry = reader.fields.get(key)
  return default if entry is None else entry.contents()


def _rope_parameters(reader, arch: str, head_dim: int, theta: float) -> dict[str, Any]:
  kind = field(reader, f"{arch}.rope.scaling.type", "none")
  rope: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
  if kind == "linear":
    rope.update(rope_type="linear", factor=float(field(reader, f"{arch}.rope.scaling.factor")))
  elif kind not in ("none", ""):
    raise ConfigError(f"GGUF {arch}.rope.scaling.type={kind!r} is not supported; "
                      "allowed: none, linear (llama3 scaling via rope_freqs)")
  freqs = next((t for t in reader.tensors if t.name == _ROPE_FREQS), None)
  if freqs is not None:
    rope = _llama3_rope(np.asarray(freqs.data, np.float64).reshape(-1), head_dim, theta)
  return rope


def _llama3_rope(divisors: np.ndarray, head_dim: int, theta: float) -> dict[str, Any]:
  """The Llama 3.1 scaling parameters that reproduce llama.cpp's per-frequency divisors.

  The file keeps only the divisors, so we recover (factor, low, high, original context) from the
  values Meta published and accept them only if they reproduce every divisor.
  """
  inverse = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  wavelength = 2 * np.pi / inverse
  factor = float(divisors.max())
  for low, high, original in ((1.0, 4.0, 8192),):
    low_wavelength, high_wavelength = original / low, original / high
    smooth = (original / wavelength - low) / (high - low)
    expected = np.where(wavelength < high_wavelength, 1.0,
                        np.where(wavelength > low_wavelength, factor,
                                 1.0 / ((1 - smooth) / factor + smooth)))
    if np.allclose(expected, divisors, rtol=1e-4):
      return {"rope_type": "llama3", "rope_theta": theta, "factor": factor,
              "low_freq_factor": low, "high_freq_factor": high,
              "original_max_position_embeddings": original}
  raise ConfigError(f"GGUF {_ROPE_FREQS} does not match Llama 3 RoPE scaling; allowed: the "
                    "llama3 scheme (factor, low 1, high 4, original context 8192) or none")


def hf_config(reader) -> dict[str, Any]:
  """The `config.json` dict of the checkpoint, from metadata only."""
  arch = field(reader, "general.architecture")
  if arch not in ARCHITECTURES:
    raise ConfigError(f"GGUF general.architecture={arch!r} is not supported; allowed: "
                      f"{sorted(ARCHITECTURES)}")

  def need(key: str):
    value = field(reader, f"{arch}.{key}")
    if value is None:
      raise ConfigError(f"GGUF file lacks metadata {arch}.{key}")
    return value

  names = {t.name for t in reader.tensors}
  hidden = int(need("embedding_length"))
  heads = int(need("attention.head_count"))
  head_dim = int(field(reader, f"{arch}.attention.key_length", hidden // heads))
  rotary = int(field(reader, f"{arch}.rope.dimension_count", head_dim))
  if rotary != head_dim:
    raise ConfigError(f"GGUF {arch}.rope.dimension_count={rotary} differs from head_dim="
                      f"{head_dim}; allowed: full rotary for {arch}")
  theta = float(field(reader, f"{arch}.rope.freq_base", 10000.0))
  embed = next(t for t in reader.tensors if t.name == "token_embd.weight")
  family = _family_of(arch, str(field(reader, "general.name", "")))
  config = dict(
      gguf_architecture=arch,
      model_type=family.hf_model_type,
      vocab_size=int(field(reader, f"{arch}.vocab_size", int(embed.shape[-1]))),
      hidden_size=hidden,
      intermediate_size=int(need("feed_forward_length")),
      num_hidden_layers=int(need("block_count")),
      num_attention_heads=heads,
      num_key_value_heads=int(field(reader, f"{arch}.attention.head_count_kv", heads)),
      head_dim=head_dim,
      rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
      max_position_embeddings=int(field(reader, f"{arch}.context_length", 8192)),
      rope_parameters=_rope_parameters(reader, arch, head_dim, theta),
      tie_word_embeddings="output.weight" not in names,
      attention_bias=any(n.endswith("attn_q.bias") for n in names),
  )
  for key, token in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding")):
    value = field(reader, f"tokenizer.ggml.{token}_token_id")
    if value is not None:
      config[key] = int(value)
  return config


def _family_of(arch: str, name: str) -> families.Family:
  """The family of a file of `arch`: like transformers, the one whose marker the file's
  general.name holds (a "llama" file named Mistral is Mistral), else the one without a marker."""
  candidates = ARCHITECTURES[arch]
  marked = [f for f in candidates if f.gguf_name_marker and f.gguf_name_marker in name.lower()]
  return (marked or [f for f in candidates if not f.gguf_name_marker])[0]


def _hf_name(name: str) -> str | None:
  if name in _TOP_TENSORS:
    return _TOP_TENSORS[name]
  parts = name.split(".", 2)
  if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_TENSORS:
    return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}"
  return None


def _unpermute(rows: np.ndarray, heads: int) -> np.ndarray:
  """Inverse of llama.cpp's `permute`: per head, rows [pairs, 2] back to [2, pairs]."""
  per_head = rows.reshape(heads, rows.shape[0] // heads // 2, 2, *rows.shape[1:])
  return per_head.swapaxes(1, 2).reshape(rows.shape)


def hf_tensors(reader, config: dict[str, Any]) -> dict[str, np.ndarray]:
  """Every weight, dequantised to float32 and laid out as the HF checkpoint stores it."""
  return {name: dequantized(tensor, name, config) for name, tensor in weights(reader, config)}


def weights(reader, config: dict[str, Any]):
  """(HF name, the file's tensor) of every weight, nothing dequantised (the data stays mapped)."""
  for tensor in reader.tensors:
    if tensor.name == _ROPE_FREQS:
      continue  # folded into rope_parameters by hf_config
    name = _hf_name(tensor.name)
    if name is None:
      raise ConfigError(f"GGUF tensor {tensor.name!r} is not part of a {config['model_type']} "
                        "checkpoint we can compute exactly")
    yield name, tensor


def dequantized(tensor, name: str, config: dict[str, Any]) -> np.ndarray:
  """One weight of the file, dequantised to float32 and laid out as the HF checkpoint has it."""
  import gguf

  permute = families.BY_MODEL_TYPE[config["model_type"]].gguf_permuted_qk
  try:
    value = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
  except NotImplementedError:
    raise ConfigError(f"GGUF tensor {tensor.name!r} has type {tensor.tensor_type.name}, which "
                      "the gguf package cannot dequantise") from None
  # GGUF lists dims innermost first; numpy's row-major order is the reverse, i.e. HF's.
  value = np.asarray(value, np.float32).reshape(tuple(int(d) for d in reversed(tensor.shape)))
  if permute and ".self_attn.q_proj." in name:
    value = _unpermute(value, config["num_attention_heads"])
  elif permute and ".self_attn.k_proj." in name:
    value = _unpermute(value, config["num_key_value_heads"])
  return value
