"""The family contract: one file per family in families/, each building one Family, and no
family's name spelled out in the checkpoint or model code that reads them."""

import pathlib
import re

import pytest

from minitron_jax import families
from minitron_jax.checkpoints import hf_config
from minitron_jax.models import config as config_lib

PACKAGE = pathlib.Path(families.__file__).parent
SHARED = {"__init__", "family", "windows", "experts"}


def test_every_family_file_builds_one_registered_family():
  files = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem not in SHARED)
  assert files == sorted(families.NAMES)
  for name in files:
    text = (PACKAGE / f"{name}.py").read_text()
    assert len(re.findall(r"^\w+ = Family\(", text, re.M)) == 1, name
  assert len(families.BY_MODEL_TYPE) == len(families.ALL)  # model types are distinct


def test_no_family_is_named_outside_its_file():
  """Adding a family touches families/ and tests only: the readers hold no per-family branch."""
  root = PACKAGE.parent
  quoted = re.compile(r"""["'](""" + "|".join(families.NAMES) + r""")["']""")
  readers = ("checkpoints/hf_config.py", "checkpoints/hf.py", "models/model.py",
             "models/attention.py", "models/moe.py")
  found = {path: quoted.findall((root / path).read_text()) for path in readers}
  assert {path: names for path, names in found.items() if names} == {}


@pytest.mark.parametrize("name", families.NAMES)
def test_a_family_tiny_model_has_its_traits_and_round_trips(name):
  family = families.get(name)
  config = config_lib.tiny(name)
  assert config.family == name and config.is_moe == family.moe
  assert {k: getattr(config, k) for k in family.traits} == family.traits
  if name == "mixtral":  # its config.json has one intermediate_size, the experts' width
    config = config.replace(intermediate_size=config.moe_intermediate_size)
  assert hf_config.config_from_hf(hf_config.config_to_hf(config)) == config


def test_an_unknown_family_is_one_line():
  with pytest.raises(config_lib.ConfigError, match=r"family='gpt2' is not supported; allowed: "):
    config_lib.tiny("gpt2")
  with pytest.raises(config_lib.ConfigError, match=r"family='gpt2' is not supported"):
    config_lib.ModelConfig(family="gpt2", vocab_size=8, hidden_size=8, num_layers=1,
                           num_attention_heads=1, num_key_value_heads=1, head_dim=8,
                           intermediate_size=8)
