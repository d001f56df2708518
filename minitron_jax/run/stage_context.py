"""What every stage reads: the models it starts from (`ModelRef`), its `Context`, and the mesh,
models, data settings, tokenizer and validation batches of a run's config.

A leaf below the stages: stages.py and teacher_logits.py both build on it, so neither stage
module imports the other for these helpers.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Callable

import ml_collections

from minitron_jax.checkpoints import build, checkpoint
from minitron_jax.inputs import data, tokenizer
from minitron_jax.models import sharding
from minitron_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class ModelRef:
  """`path` None: the model `config.model` describes; else a directory `checkpoint` saved."""

  path: pathlib.Path | None = None
  label: str = "original"


@dataclasses.dataclass(frozen=True)
class Context:
  cfg: ml_collections.ConfigDict
  directory: pathlib.Path
  source: ModelRef = ModelRef()
  teacher: ModelRef = ModelRef()
  target: dict | None = None
  distill_steps: int | None = None
  log: Callable[[str], None] = print


def mesh_of(cfg: ml_collections.ConfigDict):
  return sharding.make_mesh(sharding.MeshConfig(**cfg.mesh))


def load(cfg: ml_collections.ConfigDict, ref: ModelRef, mesh):
  """(config, params placed on the mesh) of a model reference."""
  if ref.path is None:
    model_config = build.model_config(cfg.model)
    config, params = build.load_model(
        cfg.model, out_shardings=sharding.param_shardings(model_config, mesh))
    return config, sharding.shard_params(config, params, mesh)
  if not checkpoint.is_saved_model(ref.path):
    raise ConfigError(f"no saved model at {ref.path}; run the stage that produces it")
  compute = build.compute_options(cfg.model)
  config = checkpoint.load_config(ref.path).replace(**compute)  # how to compute is this run's
  return config, checkpoint.load_model(ref.path, sharding.param_shardings(config, mesh))[1]


def data_config(cfg: ml_collections.ConfigDict, **changes) -> data.DataConfig:
  return data.DataConfig.from_dict({**cfg.data.to_dict(), **changes})


def load_tokenizer(cfg: ml_collections.ConfigDict, vocab_size: int):
  spec = cfg.tokenizer or cfg.model.hf_path
  if not spec:
    raise ConfigError("config.tokenizer is empty and there is no model.hf_path to read "
                      "tokenizer.json from; set tokenizer='bytes' or a tokenizer path")
  tok = tokenizer.load_tokenizer(spec)
  if tok.vocab_size > vocab_size:
    raise ConfigError(f"tokenizer {tok.name} has {tok.vocab_size} tokens; the model's "
                      f"vocab_size={vocab_size} is smaller")
  return tok


def validation(cfg: ml_collections.ConfigDict, vocab_size: int) -> list:
  """The fixed validation batches every stage reports its loss on."""
  return data.validation_batches(data_config(cfg), load_tokenizer(cfg, vocab_size),
                                 cfg.eval_batches)
