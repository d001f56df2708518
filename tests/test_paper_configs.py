"""The paper-scale configs: architectures and parameter counts from abstract shapes only, and each
config's runlocal smoke test through the whole pipeline."""

import importlib.util
import json
import pathlib

import pytest

from minitron_jax import build, pipeline, prune, search
from minitron_jax.config import ConfigError

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def get_config(name: str, arg: str = ""):
  """configs/NAME.py's get_config; NAME may carry an argument: 'file:variant=depth'."""
  name, _, fixed = name.partition(":")
  arg = ",".join(a for a in (fixed, arg) if a)
  spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _pruned(source, target):
  return source.replace(**prune.validate_target(source, dict(target)))


# Parameter counts of METHOD.md §6 / the papers' tables, in billions (rounded as published).
@pytest.mark.parametrize("name, published", [
    ("nemotron4_15b_to_8b", {"source": 15.6, "target": 8.3}),
    ("llama3_1_8b_to_4b:variant=width", {"source": 8.0, "target": 4.5}),
    ("llama3_1_8b_to_4b:variant=depth", {"source": 8.0, "target": 4.5}),
])
def test_single_stage_configs_build_the_papers_architectures(name, published):
  config = get_config(name)
  source = build.model_config(config.model)  # abstract: no weights are read or made
  assert round(source.num_params() / 1e9, 1) == published["source"]
  assert round(_pruned(source, config.prune.target).num_params() / 1e9, 1) == published["target"]


def test_iterative_config_builds_minitron_8b_then_4b():
  config = get_config("nemotron4_15b_to_4b")
  source = build.model_config(config.model)
  assert source.vocab_size == 256000 and source.activation == "relu2"
  first, second = config.compression
  eight = _pruned(source, first["target"])
  four = _pruned(eight, second["target"])
  assert round(eight.num_params() / 1e9, 1) == 8.3
  assert round(four.num_params() / 1e9, 1) == 4.2
  assert (second["teacher"], four.num_attention_heads, four.intermediate_size) == (
      "original", 24, 9216)


def test_search_space_of_the_15b_to_8b_config_is_feasible():
  config = get_config("nemotron4_15b_to_8b")
  source = build.model_config(config.model)
  candidates = search.enumerate_candidates(
      source, search.SearchSpace(**{k: tuple(v) if isinstance(v, list) else v
                                    for k, v in config.search.space.to_dict().items()}))
  assert candidates
  budget = config.search.space.budget
  for candidate in candidates:
    assert abs(candidate.num_params - budget) <= config.search.space.tolerance * budget


def test_real_configs_refuse_to_run_without_a_checkpoint(tmp_path):
  with pytest.raises(ConfigError, match="model.hf_path is empty"):
    pipeline.run(get_config("llama3_1_8b_to_4b"), tmp_path)
  with pytest.raises(ConfigError, match="variant='deep' is not supported"):
    get_config("llama3_1_8b_to_4b:variant=deep")


@pytest.mark.parametrize("name", ["nemotron4_15b_to_8b", "nemotron4_15b_to_4b",
                                  "llama3_1_8b_to_4b:variant=width",
                                  "llama3_1_8b_to_4b:variant=depth"])
def test_runlocal_smoke_runs_every_stage(tmp_path, name):
  config = get_config(name, "runlocal")
  lines = []
  pipeline.run(config, tmp_path, log=lines.append)
  report = (tmp_path / "report.md").read_text()
  assert "| teacher |" in report and "distilled" in report
  metrics = json.loads((tmp_path / "evaluate" / "metrics.json").read_text())
  assert "teacher" in metrics and any("distilled" in label for label in metrics)
  if "search" in config.stages:
    result = search.SearchResult.from_json((tmp_path / "search" / "result.json").read_text())
    assert len(result.candidates) >= 2 and "Architecture search" in report
  if config.compression:
    assert (tmp_path / "2_4b" / "distill" / "model").is_dir()
    assert any("teacher (original)" in line for line in lines if "[distill]" in line)
