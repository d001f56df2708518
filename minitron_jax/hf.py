"""Exact import and export of Hugging Face checkpoints (`config.json` + `*.safetensors`).

The conversion is a name map plus one transform per tensor kind. A torch `Linear` stores
[out, in]; we store [in..., out...] with heads as their own axis, e.g. q_proj [D,N,H] and
o_proj [N,H,D]. Fields we cannot reproduce exactly are refused, never ignored.

Gemma 3 comes as text-only `gemma3_text` checkpoints (1B) and as `gemma3` vision-language ones
(4B and up). From the latter we load the language model alone (its config is the nested
`text_config`, its tensors sit under a `language_model` prefix) and skip the vision tower and
projector with a warning: on text the decoder computes what Gemma3ForConditionalGeneration does.
Exports are always the text model (`gemma3_text`, Gemma3ForCausalLM).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import warnings
from typing import Any, Mapping

import jax
import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from minitron_jax import atomic, distributed, gguf_checkpoint, hf_moe
from minitron_jax import model as model_lib
from minitron_jax.config import ACTIVATIONS, MOE_FAMILIES, ModelConfig, RopeScaling
from minitron_jax.errors import ConfigError

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "nemotron": "NemotronForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    **hf_moe.ARCHITECTURES,
}
# Family -> Hugging Face model_type where the two differ.
_MODEL_TYPES = {"gemma3": "gemma3_text"}
_GEMMA_FAMILIES = ("gemma", "gemma2", "gemma3")
# transformers' Gemma3TextConfig defaults: hub `gemma3` configs leave them out of text_config.
_GEMMA3_TEXT_DEFAULTS = dict(
    vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
    num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=131_072,
    rms_norm_eps=1e-6, query_pre_attn_scalar=256, sliding_window=4096, tie_word_embeddings=True)
# Tensor names of a `gemma3` (vision + text) checkpoint: transformers 5 writes the first prefix,
# hub checkpoints saved by 4.x the second; both name the same text model tensors.
_GEMMA3_TEXT_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                         ("language_model.lm_head.", "lm_head."))
_GEMMA3_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                           "model.multi_modal_projector.")
_CARRIED_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", *hf_moe.CARRIED_FIELDS)
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
# Gemma 2/3 sandwich norms: post_attention_layernorm normalises the attention output there, so the
# MLP's pre-norm has its own name (in Gemma 1, as in Llama, post_attention_layernorm is that one).
_POST_NORM_TENSORS: dict[tuple[str, ...], tuple[str, Layout]] = {
    ("mlp_norm", "scale"): ("pre_feedforward_layernorm.weight", "vector"),
    ("attn_post_norm", "scale"): ("post_attention_layernorm.weight", "vector"),
    ("mlp_post_norm", "scale"): ("post_feedforward_layernorm.weight", "vector"),
}
# Tensors some checkpoints carry that hold nothing we compute from.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# ----------------------------------------------------------------------------- config


def _rope_from_hf(hf: Mapping[str, Any], family: str, params: Mapping[str, Any] | None = None
                  ) -> tuple[float, RopeScaling | None, float]:
  if params is None:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  if params and all(isinstance(v, Mapping) for v in params.values()):
    raise ConfigError(f"per-layer-type rope_parameters {sorted(params)} are not supported for "
                      f"{family}; allowed: one rope setting for every layer")
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


def _gemma3_rope(hf: Mapping[str, Any]) -> tuple[float, RopeScaling | None, float | None]:
  """(global theta, global scaling, local theta) from per-layer-type rope_parameters
  (transformers 5) or the older rope_theta / rope_scaling / rope_local_base_freq fields."""
  params = hf.get("rope_parameters")
  if isinstance(params, Mapping) and "full_attention" in params:
    full = dict(params["full_attention"] or {})
    local = dict(params.get("sliding_attention") or {})
  else:
    full = {**(hf.get("rope_scaling") or params or {}),
            "rope_theta": (params or {}).get("rope_theta", hf.get("rope_theta", 1e6))}
    local = {}
  full.setdefault("rope_theta", 1e6)
  theta, scaling, _ = _rope_from_hf(hf, "gemma3", full)
  if local.get("rope_type", "default") != "default":
    raise ConfigError(f"sliding_attention rope_type={local['rope_type']!r} is not supported; "
                      "allowed: default (Gemma 3 scales only its global layers)")
  local_theta = float(local.get("rope_theta", hf.get("rope_local_base_freq", 10000.0)))
  return theta, scaling, local_theta


def _gemma_layer_types(hf: Mapping[str, Any], family: str, num_layers: int) -> list[str]:
  """HF's default layer_types: Gemma 2 alternates, Gemma 3 makes every 6th layer global."""
  pattern = 2 if family == "gemma2" else int(hf.get("sliding_window_pattern") or 6)
  return hf.get("layer_types") or [
      "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)]


def _sliding_from_hf(hf: Mapping[str, Any], family: str, num_layers: int):
  if family in ("mistral", "mixtral"):
    return hf.get("sliding_window"), None
  if family in ("qwen2_moe", "qwen3_moe"):
    if hf.get("use_sliding_window", False):
      raise ConfigError(f"use_sliding_window=True is not supported for {family}; allowed: false")
    return None, None
  if family in ("gemma2", "gemma3"):
    layer_types = _gemma_layer_types(hf, family, num_layers)
    unknown = set(layer_types) - {"sliding_attention", "full_attention"}
    if unknown:
      raise ConfigError(f"layer_types {sorted(unknown)} are not supported; "
                        "allowed: sliding_attention, full_attention")
    sliding = tuple(t == "sliding_attention" for t in layer_types)
    window = hf.get("sliding_window")
    if any(sliding) and not window:
      raise ConfigError(f"sliding_window={window!r} with sliding_attention layers; allowed: a "
                        "positive window")
    return (window, sliding) if any(sliding) else (None, None)
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


def text_config(hf: Mapping[str, Any]) -> dict[str, Any]:
  """The decoder's config.json fields: a `gemma3` (vision + text) config's text_config, and
  transformers' Gemma3TextConfig defaults for the fields hub Gemma 3 configs leave out."""
  hf = dict(hf)
  if hf.get("model_type") == "gemma3":
    text = hf.get("text_config")
    if not isinstance(text, Mapping):
      raise ConfigError("model_type='gemma3' config has no text_config object; allowed: a "
                        "Gemma3Config with text_config")
    # Gemma3ForConditionalGeneration never caps its logits, whatever text_config says.
    _refuse_set(text, "a gemma3 (vision + text) checkpoint", "final_logit_softcapping")
    carried = {k: hf[k] for k in (*_CARRIED_FIELDS, "tie_word_embeddings") if k in hf}
    hf = {**carried, **text, "model_type": "gemma3_text"}
  if hf.get("model_type") == "gemma3_text":
    hf = {**_GEMMA3_TEXT_DEFAULTS, **hf}
  return hf


def _refuse_set(hf: Mapping[str, Any], family: str, *fields: str) -> None:
  for name in fields:
    if hf.get(name):
      raise ConfigError(f"{name}={hf[name]!r} is not supported for {family}; allowed: null")


def _families() -> dict[str, str]:
  """Hugging Face model_type -> our family, for every decoder we compute."""
  return {_MODEL_TYPES.get(f, f): f for f in _ARCHITECTURES}


def supported_model_types() -> list[str]:
  """The `config.json` model_type values we load (`gemma3` through its text_config)."""
  return sorted([*_families(), "gemma3"])


def _check_model_type(hf: Mapping[str, Any], source: str = "") -> None:
  model_type = hf.get("model_type")
  if model_type not in _families():
    raise ConfigError(f"{source}model_type={model_type!r} is not supported; allowed: "
                      f"{supported_model_types()}")


def config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
  """A ModelConfig from a Hugging Face `config.json` dict; refuses what we cannot compute exactly."""
  hf = text_config(hf)
  _check_model_type(hf)
  family = _families()[hf["model_type"]]
  gemma = family in _GEMMA_FAMILIES
  if family in ("gemma2", "gemma3"):
    act_field, default_act = "hidden_activation", "gelu_pytorch_tanh"
  else:
    act_field, default_act = "hidden_act", {"nemotron": "relu2", "gemma": "gelu_pytorch_tanh"
                                            }.get(family, "silu")
  activation = hf.get(act_field) or default_act
  if family == "gemma" and activation == "gelu":
    activation = "gelu_pytorch_tanh"  # transformers' GemmaConfig maps the legacy value so too
  if activation not in ACTIVATIONS:
    raise ConfigError(f"{act_field}={activation!r} is not supported; allowed: {ACTIVATIONS}")
  if gemma:
    _refuse_set(hf, family, "use_bidirectional_attention")
  if family == "gemma3":
    # Gemma3Attention never passes it to the attention function: the checkpoint does not cap.
    _refuse_set(hf, family, "attn_logit_softcapping")
  heads = hf["num_attention_heads"]
  num_layers = hf["num_hidden_layers"]
  local_theta = None
  if family == "gemma3":
    theta, scaling, local_theta = _gemma3_rope(hf)
    partial = 1.0
  else:
    theta, scaling, partial = _rope_from_hf(hf, family)
  window, window_layers = _sliding_from_hf(hf, family, num_layers)
  attention_bias = bool(hf.get("attention_bias", False))
  moe = family in MOE_FAMILIES
  default_head_dim = {"qwen3": 128, "gemma": 256, "gemma2": 256, "gemma3": 256}.get(
      family, hf["hidden_size"] // heads)
  softcaps = {"gemma2": (50.0, 30.0)}.get(family, (None, None))  # Gemma2Config's defaults
  capped = lambda name, default: (None if hf.get(name, default) is None
                                  else float(hf.get(name, default)))
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
      norm={"nemotron": "layernorm1p"}.get(family, "rms1p" if gemma else "rms"),
      norm_eps=float(hf.get("norm_eps" if family == "nemotron" else "rms_norm_eps",
                            1e-5 if family == "nemotron" else 1e-6)),
      qkv_bias={"qwen2": True, "qwen2_moe": bool(hf.get("qkv_bias", True))}.get(
          family, attention_bias),
      o_bias=False if family in ("qwen2", "qwen2_moe") else attention_bias,
      mlp_bias=bool(hf.get("mlp_bias", False)),
      qk_norm=family in ("qwen3", "gemma3", "qwen3_moe"),
      post_norms=family in ("gemma2", "gemma3"),
      embedding_scale=hf["hidden_size"] ** 0.5 if gemma else None,
      query_pre_attn_scalar=(float(hf.get("query_pre_attn_scalar", 256))
                             if family in ("gemma2", "gemma3") else None),
      attn_logit_softcap=capped("attn_logit_softcapping", softcaps[0]),
      final_logit_softcap=capped("final_logit_softcapping", softcaps[1]),
      rope_theta=theta,
      rope_scaling=scaling,
      partial_rotary_factor=partial,
      sliding_window=window,
      sliding_window_layers=window_layers,
      local_rope_theta=local_theta,
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
      max_position_embeddings=hf.get("max_position_embeddings", 8192),
      hf_extras=tuple((k, tuple(v) if isinstance(v, list) else v)
                      for k, v in hf.items() if k in _CARRIED_FIELDS and v is not None),
      **(hf_moe.config_fields(hf, family) if moe else {}),
  )


def config_to_hf(config: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
  """The `config.json` dict that makes `transformers` compute exactly what our model computes."""
  family = config.family

  def refuse_unless(ok: bool, what: str):
    if not ok:
      raise ConfigError(f"{what} cannot be expressed as a Hugging Face {family} config")

  uniform_bias = config.qkv_bias == config.o_bias
  gemma, sandwich = family in _GEMMA_FAMILIES, family in ("gemma2", "gemma3")
  refuse_unless(config.is_moe == (family in MOE_FAMILIES), f"num_experts={config.num_experts}")
  refuse_unless(config.gated_mlp == (family != "nemotron"), f"gated_mlp={config.gated_mlp}")
  refuse_unless(config.norm == {"nemotron": "layernorm1p"}.get(family, "rms1p" if gemma else "rms"),
                f"norm={config.norm!r}")
  refuse_unless(config.qk_norm == (family in ("qwen3", "gemma3", "qwen3_moe")),
                f"qk_norm={config.qk_norm}")
  refuse_unless(config.post_norms == sandwich, f"post_norms={config.post_norms}")
  # A Gemma embedding scale other than sqrt(hidden) (a pruned model's) is folded into the weights
  # by params_to_hf; other families have none.
  refuse_unless((config.embedding_scale is not None) == gemma,
                f"embedding_scale={config.embedding_scale}")
  refuse_unless(sandwich or config.query_pre_attn_scalar is None,
                f"query_pre_attn_scalar={config.query_pre_attn_scalar}")
  refuse_unless(family == "gemma2" or config.attn_logit_softcap is None,
                f"attn_logit_softcap={config.attn_logit_softcap}")
  refuse_unless(sandwich or config.final_logit_softcap is None,
                f"final_logit_softcap={config.final_logit_softcap}")
  refuse_unless(family == "gemma3" or config.local_rope_theta is None,
                f"local_rope_theta={config.local_rope_theta}")
  refuse_unless(family == "nemotron" or config.partial_rotary_factor == 1.0,
                f"partial_rotary_factor={config.partial_rotary_factor}")
  if family == "qwen2":
    refuse_unless(config.qkv_bias and not config.o_bias and not config.mlp_bias,
                  f"qkv_bias={config.qkv_bias}, o_bias={config.o_bias}, mlp_bias={config.mlp_bias}")
  elif family == "qwen2_moe":
    refuse_unless(not config.o_bias and not config.mlp_bias,
                  f"o_bias={config.o_bias}, mlp_bias={config.mlp_bias}")
  elif family in ("mistral", "mixtral"):
    refuse_unless(not (config.qkv_bias or config.o_bias or config.mlp_bias), "biases")
  else:
    refuse_unless(uniform_bias, f"qkv_bias={config.qkv_bias} with o_bias={config.o_bias}")
  refuse_unless(family in ("llama", "nemotron") or not config.mlp_bias,
                f"mlp_bias={config.mlp_bias}")
  refuse_unless(family in ("mistral", "mixtral", "qwen2", "qwen3", "gemma2", "gemma3")
                or config.sliding_window is None, f"sliding_window={config.sliding_window}")
  refuse_unless(family not in ("mistral", "mixtral") or config.sliding_window_layers is None,
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

  if family == "gemma3":
    # One rope setting per layer type; local layers are unscaled at their own base.
    local = ({"rope_type": "default", "rope_theta": config.local_rope_theta}
             if config.local_rope_theta is not None else dict(rope))
    rope = {"full_attention": rope, "sliding_attention": local}

  hf: dict[str, Any] = dict(
      architectures=[_ARCHITECTURES[family]],
      model_type=_MODEL_TYPES.get(family, family),
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
  if family == "gemma3":
    del hf["rope_theta"]  # lives in the per-layer-type rope_parameters
    hf.pop("rope_scaling", None)
  if sandwich:
    as_int = lambda x: int(x) if float(x).is_integer() else x  # transformers types it int
    hf.update(
        hidden_activation=hf.pop("hidden_act"),
        query_pre_attn_scalar=as_int(config.query_pre_attn_scalar or config.head_dim),
        attn_logit_softcapping=config.attn_logit_softcap,
        final_logit_softcapping=config.final_logit_softcap,
        sliding_window=config.sliding_window or config.max_position_embeddings,
        layer_types=["sliding_attention" if w is not None else "full_attention"
                     for w in config.layer_windows()],
        use_bidirectional_attention=False)
  if gemma:
    hf["attention_bias"] = config.qkv_bias
  if family == "nemotron":
    hf.update(norm_eps=config.norm_eps, partial_rotary_factor=config.partial_rotary_factor,
              attention_bias=config.qkv_bias, mlp_bias=config.mlp_bias)
  else:
    hf["rms_norm_eps"] = config.norm_eps
  if family in ("llama", "qwen3", "qwen3_moe"):
    hf["attention_bias"] = config.qkv_bias
  if family == "llama":
    hf["mlp_bias"] = config.mlp_bias
  if family in ("mistral", "mixtral"):
    hf["sliding_window"] = config.sliding_window
  if config.is_moe:
    hf.update(hf_moe.config_to_hf(config))
  if family == "qwen2_moe":
    hf["qkv_bias"] = config.qkv_bias
  if family in ("qwen2_moe", "qwen3_moe"):
    hf.update(use_sliding_window=False, sliding_window=None)
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
  layer_tensors = {**_LAYER_TENSORS, **(_POST_NORM_TENSORS if config.post_norms else {}),
                   **(hf_moe.layer_tensors(config.family) if config.is_moe else {})}
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

  extra = sorted(n for n in tensors if n not in used and not n.endswith(_IGNORED_SUFFIXES)
                 and not (config.tie_word_embeddings and n == "lm_head.weight"))
  if extra:
    raise ConfigError(f"checkpoint has {len(extra)} tensors the config does not describe, "
                      f"e.g. {extra[:3]}")
  return params


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
    if hf_config.get("model_type") == "gemma3":
      tensors = gemma3_text_tensors(tensors, path)
  if param_dtype is not None:
    config = config.replace(param_dtype=param_dtype)
  return config, params_from_hf(config, tensors)


def gemma3_text_tensors(tensors: Mapping[str, np.ndarray], source="the checkpoint"
                        ) -> dict[str, np.ndarray]:
  """The language model's tensors of a `gemma3` (vision + text) checkpoint, under the names a
  text-only Gemma3ForCausalLM gives them; the vision tower and projector are left out, with a
  warning naming how many tensors that is."""
  text, vision = {}, 0
  for name, tensor in tensors.items():
    if name.startswith(_GEMMA3_VISION_PREFIXES):
      vision += 1
      continue
    for prefix, replacement in _GEMMA3_TEXT_PREFIXES:
      if name.startswith(prefix):
        name = replacement + name[len(prefix):]
        break
    text[name] = tensor
  if vision:
    warnings.warn(f"{source}: gemma3 checkpoint holds a vision tower; only the text model is "
                  f"supported: {vision} vision tensors were left out", stacklevel=3)
  return text


def save(path: str | os.PathLike, config: ModelConfig, params: model_lib.Params, *,
         dtype: str = "float32", max_shard_bytes: int = _DEFAULT_SHARD_BYTES) -> None:
  """Writes config.json and safetensors shards that `transformers` loads; atomic per directory.

  Streams: weights are gathered to the host one at a time and each shard is written as soon as
  it is full, so a sharded model never sits whole on one device or host. Every process calls
  it; the primary one writes."""
  if dtype not in ("float32", "bfloat16"):
    raise ConfigError(f"dtype={dtype!r} is not supported; allowed: float32, bfloat16")
  np_dtype = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
  hf_config = config_to_hf(config, dtype)
  tensors = ((name, tensor.astype(np_dtype)) for name, tensor in iter_params_to_hf(config, params))
  if distributed.is_primary():
    _write(path, tensors, hf_config, max_shard_bytes)
  else:
    for _ in tensors:  # the gathers are collective: take part, write nothing
      pass
  distributed.barrier(f"exported {path}")


def _write(path, tensors, hf_config, max_shard_bytes) -> None:
  with atomic.directory(path, collective=False) as staging:
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
