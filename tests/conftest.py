"""Eight simulated CPU devices for the whole suite: sharding tests need them, others use device 0.

The suite compiles thousands of small programs and runs each for milliseconds, so XLA's CPU
backend optimises at level 1 instead of 2: compiling takes about a quarter less time, and
results stay within round-off. The level changes round-off, by machine: SmolLM2-135M's logits
differ from transformers' by 3.6e-6 to 1.0e-5 across levels 0-2, so deep models are compared at
a tolerance sized by their depth (`hf_reference.fp32_tolerance`). A level already given in
XLA_FLAGS wins.
"""

import faulthandler
import gc
import logging
import os

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_backend_optimization_level" not in _flags:
  _flags += " --xla_backend_optimization_level=1"
os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

# A crash in native code prints only the crashing thread's Python stack: short enough to survive
# a truncated CI log (pytest's own handler, switched off in pyproject.toml, prints every thread).
faulthandler.enable(all_threads=False)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402  (after XLA_FLAGS)
import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Frees each module's compiled XLA programs and arrays when it ends: one process runs the
  whole suite, and without this its memory only grows from module to module."""
  yield
  jax.clear_caches()
  gc.collect()


@pytest.fixture
def compiled(caplog):
  """A function returning the names of the programs XLA has compiled so far in the test
  ("jit(slice)", ...), from jax's compile log."""
  jax.config.update("jax_log_compiles", True)
  caplog.set_level(logging.WARNING, logger="jax._src.interpreters.pxla")
  try:
    yield lambda: [r.getMessage().split()[1] for r in caplog.records
                   if r.getMessage().startswith("Compiling ")]
  finally:
    jax.config.update("jax_log_compiles", False)
