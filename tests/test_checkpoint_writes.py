"""checkpoints/orbax_arrays.py: replicated arrays are written whole below the replica-slice
threshold (no slice program compiled) and split above it; both restore to what was saved."""

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

from minitron_jax.checkpoints import checkpoint, orbax_arrays
from minitron_jax.models import config as config_lib
from minitron_jax.models import model


def _replicated(array):
  mesh = jax.make_mesh((len(jax.devices()),), ("data",))
  return jax.device_put(array, NamedSharding(mesh, PartitionSpec()))


def test_small_replicated_arrays_are_written_whole(tmp_path, compiled):
  config = config_lib.tiny("llama")
  params = jax.tree.map(_replicated, model.init(config, 0))
  jax.clear_caches()
  checkpoint.save_model(tmp_path / "model", config, params)
  assert "jit(slice)" not in compiled()
  loaded_config, loaded = checkpoint.load_model(tmp_path / "model")
  assert loaded_config == config
  jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_large_replicated_arrays_are_still_split_among_replicas(tmp_path, compiled):
  replicas = len(jax.devices())
  rows = orbax_arrays.MIN_REPLICA_SLICE_BYTES * replicas // (4 * 64)  # a 1 MiB float32 slice each
  array = _replicated(np.arange(rows * 64, dtype=np.float32).reshape(rows, 64))
  orbax_arrays.configure()
  jax.clear_caches()
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "array", {"w": array})
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(tmp_path / "array")
  assert "jit(slice)" in compiled()
  np.testing.assert_array_equal(restored["w"], array)
