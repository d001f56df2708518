"""Gemma 3: Gemma 2 without attention caps, with RMS-normalised queries and keys, every 6th layer
global, and an unscaled RoPE base of its own on local layers.

It comes as text-only `gemma3_text` checkpoints (1B) and as `gemma3` vision-language ones (4B and
up). From the latter we load the language model alone: its config is the nested `text_config`,
its tensors sit under a `language_model` prefix, and the vision tower and projector are left out
with a warning (on text the decoder computes what Gemma3ForConditionalGeneration does). Exports
are always the text model (`gemma3_text`, Gemma3ForCausalLM).
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping

from minitron_jax.errors import ConfigError
from minitron_jax.families import gemma, windows
from minitron_jax.families.family import CARRIED_FIELDS, Family, refuse_set

# transformers' Gemma3TextConfig defaults: hub `gemma3` configs leave them out of text_config.
TEXT_DEFAULTS = dict(
    vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
    num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=131_072,
    rms_norm_eps=1e-6, query_pre_attn_scalar=256, sliding_window=4096, tie_word_embeddings=True)
# Tensor names of a `gemma3` (vision + text) checkpoint: transformers 5 writes the first prefix,
# hub checkpoints saved by 4.x the second; both name the same text model tensors.
_TEXT_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                  ("language_model.lm_head.", "lm_head."))
_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                    "model.multi_modal_projector.")


def text_config(hf: Mapping[str, Any]) -> dict[str, Any]:
  """A `gemma3` (vision + text) config's text model fields, as a `gemma3_text` config."""
  text = hf.get("text_config")
  if not isinstance(text, Mapping):
    raise ConfigError("model_type='gemma3' config has no text_config object; allowed: a "
                      "Gemma3Config with text_config")
  # Gemma3ForConditionalGeneration never caps its logits, whatever text_config says.
  refuse_set(text, "a gemma3 (vision + text) checkpoint", "final_logit_softcapping")
  carried = {k: hf[k] for k in (*CARRIED_FIELDS, "tie_word_embeddings") if k in hf}
  return {**carried, **text, "model_type": "gemma3_text"}


def text_tensors(tensors: Mapping[str, Any], source: str = "the checkpoint") -> dict[str, Any]:
  """The language model's tensors of a `gemma3` checkpoint, under the names a text-only
  Gemma3ForCausalLM gives them; the vision tower and projector are left out, with a warning
  naming how many tensors that is."""
  text, vision = {}, 0
  for name, tensor in tensors.items():
    if name.startswith(_VISION_PREFIXES):
      vision += 1
      continue
    for prefix, replacement in _TEXT_PREFIXES:
      if name.startswith(prefix):
        name = replacement + name[len(prefix):]
        break
    text[name] = tensor
  if vision:
    warnings.warn(f"{source}: gemma3 checkpoint holds a vision tower; only the text model is "
                  f"supported: {vision} vision tensors were left out", stacklevel=3)
  return text


def rope(hf: Mapping[str, Any]) -> tuple[dict[str, Any], float]:
  """(global rope dict, local theta) from per-layer-type rope_parameters (transformers 5) or the
  older rope_theta / rope_scaling / rope_local_base_freq fields."""
  params = hf.get("rope_parameters")
  if isinstance(params, Mapping) and "full_attention" in params:
    full = dict(params["full_attention"] or {})
    local = dict(params.get("sliding_attention") or {})
  else:
    full = {**(hf.get("rope_scaling") or params or {}),
            "rope_theta": (params or {}).get("rope_theta", hf.get("rope_theta", 1e6))}
    local = {}
  full.setdefault("rope_theta", 1e6)
  if local.get("rope_type", "default") != "default":
    raise ConfigError(f"sliding_attention rope_type={local['rope_type']!r} is not supported; "
                      "allowed: default (Gemma 3 scales only its global layers)")
  return full, float(local.get("rope_theta", hf.get("rope_local_base_freq", 10000.0)))


def to_hf(config, hf):
  """One rope setting per layer type (local layers unscaled at their own base), then Gemma 2's."""
  full = hf["rope_parameters"]
  local = ({"rope_type": "default", "rope_theta": config.local_rope_theta}
           if config.local_rope_theta is not None else dict(full))
  hf = {k: v for k, v in hf.items() if k not in ("rope_theta", "rope_scaling")}
  hf["rope_parameters"] = {"full_attention": full, "sliding_attention": local}
  return gemma.sandwich_to_hf(config, hf)


def tiny(hidden: int, layers: int) -> dict:
  del hidden
  return dict(query_pre_attn_scalar=24.0, rope_theta=1e6, local_rope_theta=1e4, sliding_window=8,
              sliding_window_layers=windows.every_nth_global(layers, 2))


PRESETS = {
    "gemma3_1b": dict(
        vocab_size=262144, hidden_size=1152, num_layers=26, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, intermediate_size=6912, rope_theta=1e6,
        local_rope_theta=10000.0, sliding_window=512,
        sliding_window_layers=windows.every_nth_global(26, 6), max_position_embeddings=32768),
}

GEMMA3 = Family(
    name="gemma3", architecture="Gemma3ForCausalLM", model_type="gemma3_text", **{
        **gemma.TRAITS, "refused_fields": (*gemma.TRAITS["refused_fields"],
                                           # Gemma3Attention never passes it on: it never caps.
                                           "attn_logit_softcapping")},
    qk_norm=True, post_norms=True, activation_field="hidden_activation",
    allows=frozenset({"local_rope", "sliding_window", "per_layer_windows"}),
    windows=lambda hf, layers, family: windows.gemma(
        hf, layers, pattern=int(hf.get("sliding_window_pattern") or 6)),
    rope=rope, fields_to_hf=to_hf, tiny=tiny, wrapper_model_type="gemma3",
    unwrap=text_config, unwrap_tensors=text_tensors, hf_defaults=TEXT_DEFAULTS, presets=PRESETS)
