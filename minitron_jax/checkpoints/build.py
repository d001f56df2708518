"""Turns the `model` section of an ml-collections config into (ModelConfig, params)."""

from __future__ import annotations

import ml_collections

from minitron_jax.models import config as config_lib
from minitron_jax.checkpoints import hf
from minitron_jax.models import model
from minitron_jax.errors import ConfigError

# Model settings that change how it computes, never what it holds: applied over any checkpoint.
COMPUTE_OPTIONS = ("dtype", "remat", "attention", "attention_block_size", "moe_capacity_factor",
                   "moe_dispatch")


def compute_options(section: ml_collections.ConfigDict) -> dict:
  """The model section's settings for how to compute (not what): they apply over any checkpoint.
  moe_capacity_factor 0 (a config file cannot override None) is the exact grouped dispatch."""
  options = {k: section[k] for k in COMPUTE_OPTIONS if section.get(k) not in (None, "")}
  if "moe_capacity_factor" in options and not options["moe_capacity_factor"]:
    options["moe_capacity_factor"] = None
  return options


def model_config(section: ml_collections.ConfigDict) -> config_lib.ModelConfig:
  """The architecture: a Hugging Face directory's config.json or a GGUF file's metadata, or a
  preset with overrides."""
  if section.get("hf_path"):
    return hf.load_config(section.hf_path)
  if section.preset not in config_lib.PRESETS:
    raise ConfigError(f"model.preset={section.preset!r} is unknown; allowed: "
                      f"{sorted(config_lib.PRESETS)}")
  overrides = dict(section.get("overrides", {}))
  return config_lib.PRESETS[section.preset](**overrides)


def load_model(section: ml_collections.ConfigDict, out_shardings=None):
  """(config, params): loaded from `hf_path` when given, else randomly initialised from `seed`."""
  if section.get("hf_path"):
    config, params = hf.load(section.hf_path)
  elif section.get("require_checkpoint"):
    raise ConfigError(missing_checkpoint(section))
  else:
    config = model_config(section)
    params = model.init(config, section.get("seed", 0), out_shardings=out_shardings)
  compute = compute_options(section)
  return config.replace(**compute), params


def missing_checkpoint(section: ml_collections.ConfigDict) -> str:
  """Why a config that compresses a real checkpoint cannot run without `hf_path`."""
  if section.get("checkpoint_hint"):
    return f"model.hf_path is empty; {section.checkpoint_hint}"
  return (f"model.hf_path is empty; this config compresses a real {section.preset} checkpoint: "
          "pass --config.model.hf_path=DIR (or add :runlocal to the config path for a smoke test)")
