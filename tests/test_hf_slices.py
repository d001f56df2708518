"""A Hugging Face directory read straight into shards equals `hf.load` placed on the mesh, for
every family, and reads each weight's bytes once, a device's slice at a time, in the file's
dtype."""

import math

import jax
import numpy as np
import pytest

from minitron_jax import families
from minitron_jax.checkpoints import hf, hf_slices
from minitron_jax.models import config as config_lib, model, partitioning, sharding

MESH = dict(data=2, fsdp=2, tensor=2)


def _saved(tmp_path, family: str, dtype: str):
  config = config_lib.tiny(family, num_layers=2)
  params = model.init(config, 0)
  hf.save(tmp_path / family, config, params, dtype=dtype)
  return tmp_path / family


def _leaves(tree) -> dict:
  return {jax.tree_util.keystr(path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("family", families.NAMES)
def test_sliced_reading_equals_the_whole_read_on_the_mesh(tmp_path, family):
  directory = _saved(tmp_path, family, "float32")
  want_config, want = hf.load(directory)
  mesh = partitioning.make_mesh(partitioning.MeshConfig(**MESH))
  shardings = sharding.param_shardings(want_config, mesh)
  reads = []
  config, got = hf_slices.load(directory, shardings,
                               on_read=lambda name, box, size: reads.append(size))
  assert config == want_config
  want, got = _leaves(want), _leaves(got)
  assert want.keys() == got.keys()
  for key, leaf in got.items():
    assert leaf.sharding.is_equivalent_to(_leaves(shardings)[key], leaf.ndim), key
    assert leaf.dtype == want[key].dtype, key
    np.testing.assert_array_equal(np.asarray(leaf), want[key], err_msg=key)
  # One process holds every device: every value is read at least once and at most once per
  # device holding it, a slice at a time, never a whole model.
  total = sum(leaf.nbytes for leaf in want.values())
  assert total <= sum(reads) <= sum(_bytes_on_devices(leaf) for leaf in got.values())
  assert max(reads) < total / 4


def _bytes_on_devices(leaf) -> int:
  """The bytes of `leaf` summed over the devices that hold a slice of it."""
  return sum(math.prod(len(range(*s.indices(n))) for s, n in zip(index, leaf.shape))
             for index in leaf.sharding.devices_indices_map(leaf.shape).values()
             ) * leaf.dtype.itemsize


def test_a_bfloat16_directory_is_read_in_bfloat16_and_cast_on_the_devices(tmp_path):
  directory = _saved(tmp_path, "qwen3", "bfloat16")
  want_config, want = hf.load(directory)
  mesh = partitioning.make_mesh(partitioning.MeshConfig(**MESH))
  reads = []
  _, got = hf_slices.load(directory, sharding.param_shardings(want_config, mesh),
                          on_read=lambda name, box, size: reads.append(size))
  for key, leaf in _leaves(got).items():
    assert leaf.dtype == np.float32, key
    np.testing.assert_array_equal(np.asarray(leaf), _leaves(want)[key], err_msg=key)
  # Two bytes a value were read: the float32 copies exist only on the devices.
  values = sum(leaf.size for leaf in _leaves(want).values())
  assert 2 * values <= sum(reads) <= sum(_bytes_on_devices(leaf) for leaf in _leaves(got).values()) // 2
