"""The paper-scale configs: architectures and parameter counts from abstract shapes only, and each
config's runlocal smoke test through the whole pipeline."""

import importlib.util
import json
import math
import pathlib

import pytest

from minitron_jax.checkpoints import build
from minitron_jax.compress import prune, search
from minitron_jax.run import pipeline, plan, run_config, validate
from minitron_jax.errors import ConfigError

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


def _as_on_the_card(count: int) -> float:
  """Billions to one decimal as Qwen's model card writes them: cut, not rounded (its 3.3B
  activated parameters are 3.35B)."""
  return math.floor(count / 1e8) / 10


def test_qwen3_moe_config_prunes_experts_of_the_cards_architecture():
  config = get_config("qwen3_30b_a3b_prune")
  source = build.model_config(config.model)
  assert (source.family, source.num_experts, source.num_experts_per_tok) == ("qwen3_moe", 128, 8)
  assert (_as_on_the_card(source.num_params()), _as_on_the_card(source.num_active_params())) == (
      30.5, 3.3)
  pruned = search.pruned_config(source, prune.validate_target(source, dict(config.prune.target)))
  assert (pruned.num_experts, pruned.moe_intermediate_size, pruned.hidden_size) == (96, 640, 1792)
  assert (round(pruned.num_params() / 1e9, 1), round(pruned.num_active_params() / 1e9, 2)) == (
      17.2, 2.67)


@pytest.mark.parametrize("arg", ["", "runlocal"])
def test_qwen3_moe_search_space_is_feasible_under_active_params_and_memory(arg):
  config = get_config("qwen3_30b_a3b_prune", arg)
  source = build.model_config(config.model)
  assert source.is_moe and source.family == "qwen3_moe"
  space = plan.search_space(config)
  assert space.budget == 0 and space.active_params and space.memory
  candidates = search.enumerate_candidates(source, space)
  assert len(candidates) >= 2
  tolerance = space.tolerance
  for candidate in candidates:
    shape = search.pruned_config(source, candidate.target)
    # Counted here from the shape, not taken from the candidate.
    active = shape.num_active_params()
    memory = shape.memory_bytes(space.memory_batch, space.memory_seq_len, space.memory_dtype)
    assert abs(active - space.active_params) <= tolerance * space.active_params, candidate.name
    assert abs(memory - space.memory) <= tolerance * space.memory, candidate.name
    assert shape.num_experts_per_tok == source.num_experts_per_tok <= shape.num_experts
  prune_target = prune.validate_target(source, dict(config.prune.target))
  assert source.num_experts_per_tok <= prune_target["num_experts"] < source.num_experts
  if not arg:
    assert len(candidates) == 17
    assert {c.target["num_experts"] for c in candidates} == {96, 112, 128}
    assert prune_target in [c.target for c in candidates]


def test_qwen3_moe_config_validates_at_both_scales():
  config = get_config("qwen3_30b_a3b_prune", "runlocal")
  source = build.model_config(config.model)
  assert source.num_params() < 1_000_000 and source.num_experts == 6
  assert config.distill.loss.router_aux_loss_coef > 0
  assert validate.validate(config, "/nonexistent/workdir") == []
  # The real shapes (every search candidate pruned and retrained on paper), weights and data
  # aside: the preset stands in for the checkpoint, the byte tokenizer and stdlib for the data.
  config = get_config("qwen3_30b_a3b_prune")
  config.model.require_checkpoint = False
  config.update(tokenizer="bytes")
  config.data.source = "stdlib"
  assert validate.validate(config, "/nonexistent/workdir") == []


def test_runlocal_keeps_a_scaled_expert_target_at_least_top_k():
  # 16 of 128 experts scales to 1 of the tiny model's 6, below its 2 per token.
  config = get_config("qwen3_30b_a3b_prune")
  config.prune.target.num_experts = 16
  config.search.space.num_experts = (16, 128)
  run_config.runlocal(config)
  assert config.prune.target.num_experts == 2
  assert config.search.space.num_experts == (2, 6)


def test_real_configs_refuse_to_run_without_a_checkpoint(tmp_path):
  with pytest.raises(ConfigError, match="model.hf_path is empty"):
    pipeline.run(get_config("llama3_1_8b_to_4b"), tmp_path)
  with pytest.raises(ConfigError, match="variant='deep' is not supported"):
    get_config("llama3_1_8b_to_4b:variant=deep")


# llama3_1_8b_to_4b:variant=width runs the stages its depth variant runs (teacher correction
# included), on another target: its architecture is checked above, its smoke left out for time.
@pytest.mark.parametrize("name", ["nemotron4_15b_to_8b", "nemotron4_15b_to_4b",
                                  "llama3_1_8b_to_4b:variant=depth",
                                  "qwen3_30b_a3b_prune"])
def test_runlocal_smoke_runs_every_stage(tmp_path, name):
  config = get_config(name, "runlocal")
  lines = []
  pipeline.run(config, tmp_path, log=lines.append)
  report = (tmp_path / "report.md").read_text()
  assert "| teacher |" in report and "distilled" in report
  assert "![distillation curves](curves/distill.png)" in report
  metrics = json.loads((tmp_path / "evaluate" / "metrics.json").read_text())
  assert "teacher" in metrics and any("distilled" in label for label in metrics)
  if "search" in config.stages:
    result = search.SearchResult.from_json((tmp_path / "search" / "result.json").read_text())
    assert len(result.candidates) >= 2 and "Architecture search" in report
    assert "![search candidate curves](curves/search.png)" in report
  if config.compression:
    assert (tmp_path / "2_4b" / "distill" / "model").is_dir()
    assert any("teacher (original)" in line for line in lines if "[distill]" in line)
  if build.model_config(config.model).is_moe:  # experts pruned, the router balanced in training
    summary = json.loads((tmp_path / "prune" / "summary.json").read_text())
    assert summary["pruned"]["num_experts"] < summary["source"]["num_experts"]
    assert (tmp_path / "prune" / "hf" / "config.json").is_file()
    logged = [json.loads(line) for line in
              (tmp_path / "distill" / "metrics.jsonl").read_text().splitlines()]
    assert any("router_aux" in record for record in logged)
