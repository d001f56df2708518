"""A model on disk as an orbax checkpoint of its params beside its `model_config.json`.

The whole directory is built beside its destination and renamed into place (`atomic.directory`),
so a crash leaves the previous model or the new one, never params without their config.
"""

from __future__ import annotations

import json
import pathlib

import jax
import orbax.checkpoint as ocp

from minitron_jax.core import atomic
from minitron_jax.checkpoints import orbax_arrays
from minitron_jax.models import model
from minitron_jax.models.config import ModelConfig
from minitron_jax.errors import ConfigError

_CONFIG_FILE = "model_config.json"
_PARAMS_DIR = "params"


def save_model(directory: str | pathlib.Path, config: ModelConfig, params,
               extra_files: dict[str, str] | None = None) -> None:
  """Saves the params (each process writing its own shards) and the config; `extra_files`
  (name -> text) appear in the directory with them, all at once.

  Uncompressed: orbax's zstd buffers a compressed copy of every shard at once (a bf16
  Llama-3.2-1B's save on 8 CPU devices peaked 1.5 GiB above the params it wrote, without it 0)
  and model weights hardly compress. `load_model` (StandardCheckpointer) reads it as it is."""
  orbax_arrays.configure()
  with atomic.directory(directory) as staging:
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False)) as checkpointer:
      checkpointer.save(staging / _PARAMS_DIR, args=ocp.args.PyTreeSave(params))  # synchronous
    atomic.write_text(staging / _CONFIG_FILE, json.dumps(config.to_dict(), indent=2))
    for name, text in (extra_files or {}).items():
      atomic.write_text(staging / name, text)


def load_config(directory: str | pathlib.Path) -> ModelConfig:
  """Only the architecture of a saved model (nothing is read from the params)."""
  directory = pathlib.Path(directory).absolute()
  file = directory / _CONFIG_FILE
  if not file.is_file():
    raise ConfigError(f"{directory} is not a saved model (expected {_CONFIG_FILE})")
  try:
    return ModelConfig.from_dict(json.loads(file.read_text()))
  except (ValueError, TypeError, AttributeError) as e:
    if isinstance(e, ConfigError):
      raise ConfigError(f"{file}: {e}") from None
    raise ConfigError(f"{file} is damaged ({type(e).__name__}: "
                      f"{(str(e).splitlines() or [''])[0]}); delete {directory} and rerun the "
                      "stage that wrote it") from None


def load_model(directory: str | pathlib.Path, shardings=None):
  """(config, params); `shardings` (a tree like the params) restores directly onto a mesh.
  Without, every leaf comes back whole on this process's first device, whatever mesh (and
  number of processes) saved it."""
  directory = pathlib.Path(directory).absolute()
  if not (directory / _CONFIG_FILE).is_file() or not (directory / _PARAMS_DIR).is_dir():
    raise ConfigError(f"{directory} is not a saved model (expected {_CONFIG_FILE} and "
                      f"{_PARAMS_DIR}/)")
  config = load_config(directory)
  abstract = model.abstract_params(config)
  if shardings is None:
    shardings = jax.tree.map(
        lambda _: jax.sharding.SingleDeviceSharding(jax.local_devices()[0]), abstract)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      params = checkpointer.restore(directory / _PARAMS_DIR, abstract)
  except Exception as e:  # orbax and tensorstore raise bare Exceptions for damaged files
    raise ConfigError(f"{directory / _PARAMS_DIR} is damaged and cannot be restored "
                      f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}); delete "
                      f"{directory} and rerun the stage that wrote it") from None
  return config, params


def is_saved_model(directory: str | pathlib.Path) -> bool:
  directory = pathlib.Path(directory)
  return (directory / _CONFIG_FILE).is_file() and (directory / _PARAMS_DIR).is_dir()
