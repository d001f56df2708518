"""Hugging Face `config.json` <-> ModelConfig: the fields every family has (sizes, RoPE and its
scaling, the carried token ids) here, the rest from the family's own file in families/. Fields we
cannot reproduce exactly are refused. hf.py converts the tensors and reads and writes the files.
"""

from __future__ import annotations

from typing import Any, Mapping

from minitron_jax import families
from minitron_jax.errors import ConfigError
from minitron_jax.families.family import CARRIED_FIELDS, refuse_set
from minitron_jax.models.config import ACTIVATIONS, ModelConfig, RopeScaling

_REQUIRED_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "intermediate_size")


def _rope_from_hf(hf: Mapping[str, Any], family: families.Family,
                  params: Mapping[str, Any] | None = None
                  ) -> tuple[float, RopeScaling | None, float]:
  if params is None:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  if params and all(isinstance(v, Mapping) for v in params.values()):
    raise ConfigError(f"per-layer-type rope_parameters {sorted(params)} are not supported for "
                      f"{family.name}; allowed: one rope setting for every layer")
  theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
  partial = float(params.get("partial_rotary_factor",
                             hf.get("partial_rotary_factor", family.default_partial_rotary)))
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


def _rope_to_hf(config: ModelConfig) -> tuple[dict[str, Any], dict[str, Any] | None]:
  """(rope_parameters, the legacy rope_scaling field or None)."""
  rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
  if config.rope_scaling is None:
    return rope, None
  s = config.rope_scaling
  rope.update(rope_type=s.kind, factor=s.factor)
  if s.kind == "llama3":
    rope.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                original_max_position_embeddings=s.original_max_position_embeddings)
  return rope, {k: v for k, v in rope.items() if k != "rope_theta"}


def text_config(hf: Mapping[str, Any]) -> dict[str, Any]:
  """The decoder's config.json fields: a wrapping (vision + text) config's text part, and the
  defaults the family's hub configs leave out."""
  hf = dict(hf)
  wrapper = families.BY_WRAPPER_TYPE.get(hf.get("model_type"))
  if wrapper is not None:
    hf = wrapper.unwrap(hf)
  family = families.BY_MODEL_TYPE.get(hf.get("model_type"))
  if family is not None and family.hf_defaults:
    hf = {**family.hf_defaults, **hf}
  return hf


def supported_model_types() -> list[str]:
  """The `config.json` model_type values we load (wrappers through their text model)."""
  return sorted([*families.BY_MODEL_TYPE, *families.BY_WRAPPER_TYPE])


def _check_model_type(hf: Mapping[str, Any], source: str = "") -> None:
  model_type = hf.get("model_type")
  if model_type not in families.BY_MODEL_TYPE:
    raise ConfigError(f"{source}model_type={model_type!r} is not supported; allowed: "
                      f"{supported_model_types()}")


def config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
  """A ModelConfig from a Hugging Face `config.json` dict; refuses what we cannot compute exactly."""
  hf = text_config(hf)
  _check_model_type(hf)
  family = families.BY_MODEL_TYPE[hf["model_type"]]
  activation = hf.get(family.activation_field) or family.default_activation
  activation = family.activation_aliases.get(activation, activation)
  if activation not in ACTIVATIONS:
    raise ConfigError(f"{family.activation_field}={activation!r} is not supported; allowed: "
                      f"{ACTIVATIONS}")
  refuse_set(hf, family.name, *family.refused_fields)
  heads = hf["num_attention_heads"]
  num_layers = hf["num_hidden_layers"]
  local_theta = None
  if family.rope is not None:
    full, local_theta = family.rope(hf)
    theta, scaling, _ = _rope_from_hf(hf, family, full)
    partial = 1.0
  else:
    theta, scaling, partial = _rope_from_hf(hf, family)
  window, window_layers = family.windows(hf, num_layers, family.name)
  qkv_bias, o_bias = family.biases(hf)
  attn_cap, final_cap = family.default_softcaps
  capped = lambda name, default: (None if hf.get(name, default) is None
                                  else float(hf.get(name, default)))
  return ModelConfig(
      family=family.name,
      vocab_size=hf["vocab_size"],
      hidden_size=hf["hidden_size"],
      num_layers=num_layers,
      num_attention_heads=heads,
      num_key_value_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or family.default_head_dim or hf["hidden_size"] // heads,
      intermediate_size=hf["intermediate_size"],
      activation=activation,
      **family.traits,
      norm_eps=float(hf.get(family.norm_eps_field, family.default_norm_eps)),
      qkv_bias=qkv_bias,
      o_bias=o_bias,
      mlp_bias=bool(hf.get("mlp_bias", False)),
      embedding_scale=hf["hidden_size"] ** 0.5 if family.embedding_scaled else None,
      query_pre_attn_scalar=(float(hf.get("query_pre_attn_scalar", 256))
                             if family.post_norms else None),
      attn_logit_softcap=capped("attn_logit_softcapping", attn_cap),
      final_logit_softcap=capped("final_logit_softcapping", final_cap),
      rope_theta=theta,
      rope_scaling=scaling,
      partial_rotary_factor=partial,
      sliding_window=window,
      sliding_window_layers=window_layers,
      local_rope_theta=local_theta,
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", family.embedding_scaled)),
      max_position_embeddings=hf.get("max_position_embeddings", 8192),
      hf_extras=tuple((k, tuple(v) if isinstance(v, list) else v)
                      for k, v in hf.items() if k in CARRIED_FIELDS and v is not None),
      **family.fields_from_hf(hf),
  )


def _export_checks(config: ModelConfig, family: families.Family):
  """(ok, what) for every ModelConfig feature the family's config.json must be able to say."""
  allows = family.allows
  yield config.is_moe == family.moe, f"num_experts={config.num_experts}"
  yield config.gated_mlp == family.gated_mlp, f"gated_mlp={config.gated_mlp}"
  yield config.norm == family.norm, f"norm={config.norm!r}"
  yield config.qk_norm == family.qk_norm, f"qk_norm={config.qk_norm}"
  yield config.post_norms == family.post_norms, f"post_norms={config.post_norms}"
  # A Gemma embedding scale other than sqrt(hidden) (a pruned model's) is folded into the weights
  # by params_to_hf; other families have none.
  yield ((config.embedding_scale is not None) == family.embedding_scaled,
         f"embedding_scale={config.embedding_scale}")
  yield (family.post_norms or config.query_pre_attn_scalar is None,
         f"query_pre_attn_scalar={config.query_pre_attn_scalar}")
  yield ("attn_softcap" in allows or config.attn_logit_softcap is None,
         f"attn_logit_softcap={config.attn_logit_softcap}")
  yield (family.post_norms or config.final_logit_softcap is None,
         f"final_logit_softcap={config.final_logit_softcap}")
  yield ("local_rope" in allows or config.local_rope_theta is None,
         f"local_rope_theta={config.local_rope_theta}")
  yield ("partial_rotary" in allows or config.partial_rotary_factor == 1.0,
         f"partial_rotary_factor={config.partial_rotary_factor}")
  yield family.bias_rule(config)
  yield "mlp_bias" in allows or not config.mlp_bias, f"mlp_bias={config.mlp_bias}"
  yield ("sliding_window" in allows or config.sliding_window is None,
         f"sliding_window={config.sliding_window}")
  yield ("sliding_window" not in allows or "per_layer_windows" in allows
         or config.sliding_window_layers is None, "per-layer sliding windows")
  yield from family.refusals(config)


def config_to_hf(config: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
  """The `config.json` dict that makes `transformers` compute exactly what our model computes."""
  family = families.get(config.family)
  for ok, what in _export_checks(config, family):
    if not ok:
      raise ConfigError(f"{what} cannot be expressed as a Hugging Face {family.name} config")
  rope, legacy_scaling = _rope_to_hf(config)
  hf: dict[str, Any] = dict(
      architectures=[family.architecture],
      model_type=family.hf_model_type,
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
  hf[family.norm_eps_field] = config.norm_eps
  hf = family.fields_to_hf(config, hf)
  hf.update({k: list(v) if isinstance(v, tuple) else v for k, v in config.hf_extras})
  return hf
