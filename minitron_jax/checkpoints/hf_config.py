"""Hugging Face `config.json` <-> ModelConfig, family by family: which model types we compute,
their architectures, the fields each carries (RoPE scaling, sliding windows, soft-caps, Gemma 3's
nested text config), and refusals for fields we cannot reproduce exactly. hf.py converts the
tensors and reads and writes the files.
"""

from __future__ import annotations

from typing import Any, Mapping

from minitron_jax.checkpoints import hf_moe
from minitron_jax.models.config import ACTIVATIONS, MOE_FAMILIES, ModelConfig, RopeScaling
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
_CARRIED_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", *hf_moe.CARRIED_FIELDS)
_REQUIRED_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "intermediate_size")


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
