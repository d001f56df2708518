"""Eight simulated CPU devices for the whole suite: sharding tests need them, others use device 0."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import gc

import jax
import pytest


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Frees each module's compiled XLA programs and arrays when it ends: one process runs the
  whole suite, and without this its memory only grows from module to module."""
  yield
  jax.clear_caches()
  gc.collect()
