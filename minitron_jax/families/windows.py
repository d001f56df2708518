"""The sliding-window kinds of `config.json`, as (sliding_window, per-layer flags) readers and the
`layer_types` list writers: none, one window for every layer (Mistral), Qwen's upper layers, and
Gemma's alternating local and global layers."""

from __future__ import annotations

from typing import Any, Mapping

from minitron_jax.errors import ConfigError

Windows = tuple[int | None, tuple[bool, ...] | None]
LAYER_TYPES = ("sliding_attention", "full_attention")


def _flags(layer_types) -> tuple[bool, ...]:
  unknown = set(layer_types) - set(LAYER_TYPES)
  if unknown:
    raise ConfigError(f"layer_types {sorted(unknown)} are not supported; "
                      "allowed: sliding_attention, full_attention")
  return tuple(t == "sliding_attention" for t in layer_types)


def layer_types(config) -> list[str]:
  """config.json `layer_types` of a ModelConfig."""
  return ["sliding_attention" if w is not None else "full_attention"
          for w in config.layer_windows()]


def none(hf: Mapping[str, Any], num_layers: int, family: str) -> Windows:
  del num_layers
  if hf.get("sliding_window"):
    raise ConfigError(f"sliding_window={hf['sliding_window']} is not supported for {family}")
  return None, None


def never_used(hf: Mapping[str, Any], num_layers: int, family: str) -> Windows:
  """Families whose config carries `use_sliding_window` but whose models never slide."""
  del num_layers
  if hf.get("use_sliding_window", False):
    raise ConfigError(f"use_sliding_window=True is not supported for {family}; allowed: false")
  return None, None


def every_layer(hf: Mapping[str, Any], num_layers: int, family: str) -> Windows:
  del num_layers, family
  return hf.get("sliding_window"), None


def qwen(hf: Mapping[str, Any], num_layers: int, family: str) -> Windows:
  """Qwen 2/3: `use_sliding_window` turns on the window for layers from `max_window_layers` on."""
  del family
  window = hf.get("sliding_window") if hf.get("use_sliding_window", False) else None
  if window is None:
    return None, None
  types = hf.get("layer_types") or [
      "sliding_attention" if i >= hf.get("max_window_layers", 28) else "full_attention"
      for i in range(num_layers)]
  return window, _flags(types)


def every_nth_global(num_layers: int, pattern: int) -> tuple[bool, ...]:
  """Gemma's default per-layer windows: every `pattern`-th layer global, the others sliding."""
  return tuple((i + 1) % pattern != 0 for i in range(num_layers))


def gemma_layer_types(hf: Mapping[str, Any], num_layers: int, pattern: int) -> list[str]:
  """config.json `layer_types`, or HF's default for Gemma (`every_nth_global`)."""
  return hf.get("layer_types") or [LAYER_TYPES[0] if sliding else LAYER_TYPES[1]
                                   for sliding in every_nth_global(num_layers, pattern)]


def gemma(hf: Mapping[str, Any], num_layers: int, pattern: int) -> Windows:
  sliding = _flags(gemma_layer_types(hf, num_layers, pattern))
  window = hf.get("sliding_window")
  if any(sliding) and not window:
    raise ConfigError(f"sliding_window={window!r} with sliding_attention layers; allowed: a "
                      "positive window")
  return (window, sliding) if any(sliding) else (None, None)


def qwen_to_hf(config) -> dict[str, Any]:
  return dict(use_sliding_window=config.sliding_window is not None,
              sliding_window=config.sliding_window, max_window_layers=config.num_layers,
              layer_types=layer_types(config))
