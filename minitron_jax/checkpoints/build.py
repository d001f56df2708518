"""Turns the `model` section of a run's settings into (ModelConfig, params).

`ModelSource` is that section typed: where the original model comes from (a Hugging Face
directory or GGUF file, or a preset with random weights) and how every stage computes it.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Mapping

from minitron_jax.models import config as config_lib
from minitron_jax.checkpoints import hf, hf_slices
from minitron_jax.models import model
from minitron_jax.errors import ConfigError

# Model settings that change how it computes, never what it holds: applied over any checkpoint.
COMPUTE_OPTIONS = ("dtype", "remat", "attention", "attention_block_size", "moe_capacity_factor",
                   "moe_dispatch")


@dataclasses.dataclass(frozen=True)
class ModelSource:
  """hf_path: a Hugging Face directory or GGUF file ("" for `preset` with `overrides` and random
  weights from `seed`); require_checkpoint: refuse to run without hf_path (the paper configs;
  `checkpoint_hint` says where one comes from); compute: the COMPUTE_OPTIONS set, applied over
  any checkpoint."""

  hf_path: str = ""
  preset: str = "tiny"
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  seed: int = 0
  require_checkpoint: bool = False
  checkpoint_hint: str = ""
  compute: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  @classmethod
  def of(cls, section: "ModelSource | Mapping[str, Any]") -> "ModelSource":
    """The source a `model` section (a ConfigDict or a dict) describes."""
    if isinstance(section, ModelSource):
      return section
    section = dict(section.to_dict() if hasattr(section, "to_dict") else section)
    return cls(hf_path=str(section.get("hf_path") or ""), preset=section.get("preset", "tiny"),
               overrides=types.MappingProxyType(dict(section.get("overrides") or {})),
               seed=section.get("seed", 0),
               require_checkpoint=bool(section.get("require_checkpoint", False)),
               checkpoint_hint=section.get("checkpoint_hint") or "",
               compute=types.MappingProxyType(compute_options(section)))

  def describe(self) -> str:
    """Where the weights come from, in words."""
    return self.hf_path if self.hf_path else f"preset {self.preset}, seed {self.seed}"


def compute_options(section: Mapping[str, Any]) -> dict:
  """The model section's settings for how to compute (not what): they apply over any checkpoint.
  moe_capacity_factor 0 (a config file cannot override None) is the exact grouped dispatch."""
  if isinstance(section, ModelSource):
    return dict(section.compute)
  options = {k: section[k] for k in COMPUTE_OPTIONS if section.get(k) not in (None, "")}
  if "moe_capacity_factor" in options and not options["moe_capacity_factor"]:
    options["moe_capacity_factor"] = None
  return options


def model_config(section) -> config_lib.ModelConfig:
  """The architecture: a Hugging Face directory's config.json or a GGUF file's metadata, or a
  preset with overrides (`section`: a ModelSource or a `model` section)."""
  source = ModelSource.of(section)
  if source.hf_path:
    return hf.load_config(source.hf_path)
  if source.preset not in config_lib.PRESETS:
    raise ConfigError(f"model.preset={source.preset!r} is unknown; allowed: "
                      f"{sorted(config_lib.PRESETS)}")
  return config_lib.PRESETS[source.preset](**dict(source.overrides))


def load_model(section, out_shardings=None):
  """(config, params): loaded from `hf_path` when given, else randomly initialised from `seed`.
  With `out_shardings` (a tree like the params) they are born sharded: a Hugging Face directory
  is read by slices, each process reading only what its devices hold (hf_slices.py)."""
  source = ModelSource.of(section)
  if source.hf_path and out_shardings is not None:
    config, params = hf_slices.load(source.hf_path, out_shardings)
  elif source.hf_path:
    config, params = hf.load(source.hf_path)
  elif source.require_checkpoint:
    raise ConfigError(missing_checkpoint(source))
  else:
    config = model_config(source)
    params = model.init(config, source.seed, out_shardings=out_shardings)
  return config.replace(**source.compute), params


def missing_checkpoint(section) -> str:
  """Why a config that compresses a real checkpoint cannot run without `hf_path`."""
  source = ModelSource.of(section)
  if source.checkpoint_hint:
    return f"model.hf_path is empty; {source.checkpoint_hint}"
  return (f"model.hf_path is empty; this config compresses a real {source.preset} checkpoint: "
          "pass --config.model.hf_path=DIR (or add :runlocal to the config path for a smoke test)")
