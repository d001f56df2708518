"""What a model family is to us: its Hugging Face names, the architecture traits every model of it
shares, the defaults its `config.json` leaves out, and small hooks for what only it has.

A family's own file builds one `Family`; checkpoints/hf_config.py reads and writes `config.json`
through it, checkpoints/hf.py names tensors through it, and models/config.py takes its tiny test
model and its named presets from it. Hooks take plain `config.json` dicts and a ModelConfig read by attribute, so this
package imports nothing of the model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping

from minitron_jax.errors import ConfigError
from minitron_jax.families import windows as windows_lib

# Hugging Face fields with no effect on what the model computes, carried through export.
CARRIED_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "router_aux_loss_coef",
                  "router_jitter_noise")
# A tiny model's sizes before its family's traits: a few hundred thousand parameters.
TINY_BASE = dict(vocab_size=256, hidden_size=64, num_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, intermediate_size=128,
                 max_position_embeddings=512)

HfDict = Mapping[str, Any]


def _no_fields(*_) -> dict[str, Any]:
  return {}


def _no_refusals(_config) -> Iterable[tuple[bool, str]]:
  return ()


def _same_hf(_config, hf: dict[str, Any]) -> dict[str, Any]:
  return hf


def _attention_bias(hf: HfDict) -> tuple[bool, bool]:
  bias = bool(hf.get("attention_bias", False))
  return bias, bias


def refuse_set(hf: HfDict, family: str, *fields: str) -> None:
  """Refuses a config.json that sets any of `fields` (features we do not compute)."""
  for name in fields:
    if hf.get(name):
      raise ConfigError(f"{name}={hf[name]!r} is not supported for {family}; allowed: null")


def _uniform_biases(config) -> tuple[bool, str]:
  return (config.qkv_bias == config.o_bias,
          f"qkv_bias={config.qkv_bias} with o_bias={config.o_bias}")


@dataclasses.dataclass(frozen=True)
class Family:
  name: str
  architecture: str  # config.json `architectures[0]` on export
  model_type: str = ""  # config.json model_type, where it differs from `name`
  # Architecture traits every model of the family has: set on import, required on export.
  gated_mlp: bool = True
  norm: str = "rms"
  qk_norm: bool = False
  post_norms: bool = False  # Gemma 2/3 sandwich norms, with query_pre_attn_scalar and caps
  embedding_scaled: bool = False  # Gemma: embeddings times sqrt(hidden), tied head by default
  moe: bool = False
  # config.json reading: where the activation and norm epsilon live and what they default to.
  activation_field: str = "hidden_act"
  default_activation: str = "silu"
  activation_aliases: Mapping[str, str] = dataclasses.field(default_factory=dict)
  norm_eps_field: str = "rms_norm_eps"
  default_norm_eps: float = 1e-6
  default_head_dim: int | None = None  # None: hidden_size // num_attention_heads
  default_partial_rotary: float = 1.0
  default_softcaps: tuple[float | None, float | None] = (None, None)  # (attention, final)
  refused_fields: tuple[str, ...] = ()  # config.json fields that must be unset
  # ModelConfig features export can write beyond the traits, of: attn_softcap, local_rope,
  # partial_rotary, mlp_bias, sliding_window, per_layer_windows.
  allows: frozenset[str] = frozenset()
  # Hooks. biases: (qkv_bias, o_bias) from config.json; bias_rule: (ok, what) on export.
  # windows: (sliding_window, per-layer flags) from config.json, the layer count and the family
  # name (windows.py has the kinds). rope: (the global rope dict, local theta) where the family
  # keeps per-layer-type settings, else None for the common fields. fields_from_hf: further
  # ModelConfig fields. fields_to_hf: the common config.json dict -> the family's. refusals:
  # further (ok, what) export checks.
  biases: Callable[[HfDict], tuple[bool, bool]] = _attention_bias
  bias_rule: Callable[[Any], tuple[bool, str]] = _uniform_biases
  windows: Callable[[HfDict, int, str], windows_lib.Windows] = windows_lib.none
  rope: Callable[[HfDict], tuple[dict[str, Any], float | None]] | None = None
  fields_from_hf: Callable[[HfDict], dict[str, Any]] = _no_fields
  fields_to_hf: Callable[[Any, dict[str, Any]], dict[str, Any]] = _same_hf
  refusals: Callable[[Any], Iterable[tuple[bool, str]]] = _no_refusals
  # Our per-layer param path -> (HF name, layout) beyond the dense decoder's (see hf.py).
  layer_tensors: Mapping[tuple[str, ...], tuple[str, Any]] = dataclasses.field(
      default_factory=dict)
  # The tiny test model's fields beyond TINY_BASE and model_fields, from (hidden, layers).
  tiny: Callable[[int, int], dict[str, Any]] = _no_fields
  # A wrapping checkpoint's model_type (a vision + text one), its decoder's config.json fields and
  # its decoder's tensors (under our names, given where they came from); and the defaults the
  # family's hub configs leave out.
  wrapper_model_type: str = ""
  unwrap: Callable[[HfDict], dict[str, Any]] | None = None
  unwrap_tensors: Callable[[Mapping[str, Any], str], dict[str, Any]] | None = None
  hf_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  # llama.cpp: the `general.architecture` its GGUF files carry ("" for none we read); among
  # families sharing one, the word a file's general.name holds for this family (llama.cpp
  # writes Mistral as "llama"); whether its converter permuted Q/K rows for interleaved RoPE.
  gguf_architecture: str = ""
  gguf_name_marker: str = ""
  gguf_permuted_qk: bool = False
  # Named real architectures of the family (models/config.py's presets): name -> the
  # ModelConfig fields beyond model_fields(hidden_size), as plain values (rope_scaling a dict).
  presets: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)

  @property
  def hf_model_type(self) -> str:
    return self.model_type or self.name

  @property
  def traits(self) -> dict[str, Any]:
    return dict(gated_mlp=self.gated_mlp, norm=self.norm, qk_norm=self.qk_norm,
                post_norms=self.post_norms)

  def model_fields(self, hidden: int) -> dict[str, Any]:
    """The ModelConfig fields every model of the family of this width has (presets start here)."""
    fields = dict(family=self.name, activation=self.default_activation, **self.traits)
    if self.embedding_scaled:
      fields.update(embedding_scale=hidden ** 0.5, tie_word_embeddings=True,
                    norm_eps=self.default_norm_eps)
    if self.post_norms:
      fields["query_pre_attn_scalar"] = 256.0  # Gemma 2/3's head_dim, transformers' default
    return fields

  def preset_fields(self, name: str) -> dict[str, Any]:
    """The ModelConfig fields of the family's preset `name`."""
    preset = self.presets[name]
    return {**self.model_fields(preset["hidden_size"]), **preset}

  def tiny_fields(self, hidden: int | None = None, layers: int | None = None) -> dict[str, Any]:
    """The family's tiny test model (few hundred thousand parameters) at this width and depth
    (TINY_BASE's where None), before any other override."""
    hidden = hidden or TINY_BASE["hidden_size"]
    layers = layers or TINY_BASE["num_layers"]
    return {**TINY_BASE, **self.model_fields(hidden), **self.tiny(hidden, layers)}
