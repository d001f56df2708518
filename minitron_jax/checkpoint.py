"""A model on disk as an orbax checkpoint of its params beside its `model_config.json`.

Orbax writes to a temporary directory and renames it when complete, so a crash never leaves a
half-written checkpoint that looks finished.
"""

from __future__ import annotations

import json
import pathlib

import jax
import orbax.checkpoint as ocp

from minitron_jax import model
from minitron_jax.config import ConfigError, ModelConfig

_CONFIG_FILE = "model_config.json"
_PARAMS_DIR = "params"


def save_model(directory: str | pathlib.Path, config: ModelConfig, params) -> None:
  directory = pathlib.Path(directory).absolute()
  directory.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(directory / _PARAMS_DIR, params, force=True)
    checkpointer.wait_until_finished()
  tmp = directory / (_CONFIG_FILE + ".tmp")
  tmp.write_text(json.dumps(config.to_dict(), indent=2))
  tmp.replace(directory / _CONFIG_FILE)


def load_config(directory: str | pathlib.Path) -> ModelConfig:
  """Only the architecture of a saved model (nothing is read from the params)."""
  directory = pathlib.Path(directory).absolute()
  if not (directory / _CONFIG_FILE).is_file():
    raise ConfigError(f"{directory} is not a saved model (expected {_CONFIG_FILE})")
  return ModelConfig.from_dict(json.loads((directory / _CONFIG_FILE).read_text()))


def load_model(directory: str | pathlib.Path, shardings=None):
  """(config, params); `shardings` (a tree like the params) restores directly onto a mesh."""
  directory = pathlib.Path(directory).absolute()
  if not (directory / _CONFIG_FILE).is_file() or not (directory / _PARAMS_DIR).is_dir():
    raise ConfigError(f"{directory} is not a saved model (expected {_CONFIG_FILE} and "
                      f"{_PARAMS_DIR}/)")
  config = load_config(directory)
  abstract = model.abstract_params(config)
  if shardings is not None:
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
  with ocp.StandardCheckpointer() as checkpointer:
    params = checkpointer.restore(directory / _PARAMS_DIR, abstract)
  return config, params


def is_saved_model(directory: str | pathlib.Path) -> bool:
  directory = pathlib.Path(directory)
  return (directory / _CONFIG_FILE).is_file() and (directory / _PARAMS_DIR).is_dir()
