"""The model, the losses, the distillation step and the GPU benchmark import without the data
pipeline's, the run layer's or the harness's packages (the GPU machine's image has none of them);
a missing package is one line naming it and how to install it."""

import importlib
import pathlib
import subprocess
import sys

import pytest

from minitron_jax.core import optional

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOT_ON_THE_GPU_IMAGE = ("tensorflow_datasets", "lm_eval", "ml_collections", "grain",
                        "array_record", "tensorboardX", "gguf", "tokamax")

# The start of a probe run in a fresh interpreter: each package named (comma-separated) in its
# first argument raises ImportError when anything imports it.
BLOCKING = """
import importlib, importlib.abc, importlib.util, sys
blocked = set(sys.argv[1].split(","))
class Block(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path, target=None):
    if name.split(".")[0] in blocked:
      raise ImportError(f"{name} is blocked")
sys.meta_path.insert(0, Block())
"""
PROBE = BLOCKING + """
import minitron_jax.models, minitron_jax.models.model, minitron_jax.objectives.losses
import minitron_jax.objectives.fused_kld, minitron_jax.training.distill
spec = importlib.util.spec_from_file_location("gpu_suite", sys.argv[2])
module = importlib.util.module_from_spec(spec)
sys.modules["gpu_suite"] = module
spec.loader.exec_module(module)
loaded = sorted({name.split(".")[0] for name in sys.modules} & blocked)
print("loaded:", loaded)
"""


def test_model_losses_distill_step_and_benchmark_import_without_pipeline_packages():
  result = subprocess.run(
      [sys.executable, "-c", PROBE, ",".join(NOT_ON_THE_GPU_IMAGE),
       str(ROOT / "experiments" / "benchmarks" / "gpu_suite.py")],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "loaded: []" in result.stdout


def test_a_missing_package_is_one_line_naming_it_and_its_requirement(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import of it fails
  with pytest.raises(optional.MissingPackage) as raised:
    optional.module("tensorflow_datasets", "data source 'stdlib'")
  message = str(raised.value)
  assert "\n" not in message
  assert message.startswith("data source 'stdlib' needs the package 'tensorflow-datasets'")
  assert "pip install 'tensorflow-datasets==4.9.10'" in message  # as pyproject pins it
  # A package of an extra only says which extra brings it.
  assert "the minitron-jax extra" in optional.install_hint("pytest")
  assert optional.install_hint("not-a-dependency") == "pip install not-a-dependency"
  # A module missing inside an installed package is a real bug, not a missing package.
  with pytest.raises(ModuleNotFoundError):
    optional.module("minitron_jax.no_such_module", "nothing")
  assert importlib.import_module("json") is optional.module("json", "nothing")


def test_the_main_job_without_a_package_is_one_line_and_exit_2():
  script = ("import sys; sys.modules['ml_collections'] = None; "
            "sys.argv = ['main']; import minitron_jax.main")
  result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and "'ml-collections'" in lines[0] and "pip install" in lines[0], lines
