"""Each subpackage exports its entry points (`from minitron_jax.compress import estimate`), each
the object its own module defines, imported only when first reached: importing a subpackage
pulls in none of the optional packages, whatever its modules need."""

import importlib
import pathlib
import subprocess
import sys

import pytest

from test_optional_imports import BLOCKING, NOT_ON_THE_GPU_IMAGE

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "minitron_jax"
# families exports its families eagerly (they are the package); stages is the stage registry's.
EXPORTING = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py")
                   if p.parent.name != "families")


def test_every_subpackage_states_its_entry_points():
  assert len(EXPORTING) >= 10
  for name in EXPORTING:
    package = importlib.import_module(f"minitron_jax.{name}")
    assert package.ENTRY_POINTS, name
    assert sorted(package.__all__) == sorted(n for names in package.ENTRY_POINTS.values()
                                             for n in names), name


@pytest.mark.parametrize("name", EXPORTING)
def test_each_entry_point_is_its_module_s_own_object(name):
  package = importlib.import_module(f"minitron_jax.{name}")
  modules = {p.stem for p in (PACKAGE / name).glob("*.py")} | {
      p.parent.name for p in (PACKAGE / name).glob("*/__init__.py")}
  for module_name, names in package.ENTRY_POINTS.items():
    assert module_name in modules, (name, module_name)
    module = importlib.import_module(f"minitron_jax.{name}.{module_name}")
    for entry in names:
      assert entry not in modules, f"{name}.{entry} would hide its module"
      assert getattr(package, entry) is getattr(module, entry), (name, entry)
      assert entry in dir(package)
  with pytest.raises(AttributeError, match=f"'minitron_jax.{name}' has no attribute 'nothing'"):
    getattr(package, "nothing")


PROBE = BLOCKING + """
for name in sys.argv[2].split(","):
  package = importlib.import_module(f"minitron_jax.{name}")
  dir(package)
from minitron_jax.models import ModelConfig, apply, init
from minitron_jax.training import Distiller, OptimizerConfig
from minitron_jax.inputs import load_tokenizer
loaded = sorted({name.split(".")[0] for name in sys.modules} & blocked)
print("loaded:", loaded)
"""


def test_importing_a_subpackage_pulls_in_no_optional_package():
  result = subprocess.run(
      [sys.executable, "-c", PROBE, ",".join(NOT_ON_THE_GPU_IMAGE), ",".join(EXPORTING)],
      cwd=PACKAGE.parent, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "loaded: []" in result.stdout
