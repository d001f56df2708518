"""Whole-run validation: every problem of a run's settings is found before any stage runs, each
on one line naming the setting, and nothing is written."""

import glob
import importlib.util
import pathlib
import subprocess
import sys

import ml_collections
import pytest

from minitron_jax.inputs import corpus, tokenizer
from minitron_jax.run import pipeline, validate
from minitron_jax.tools import sweep
from minitron_jax.errors import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]


def get_config(name: str, arg: str = "") -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _problems(config, workdir="/nonexistent/workdir"):
  return validate.validate(config, workdir)


def _refused(config, tmp_path) -> str:
  """pipeline.run's error for `config`, having checked that the workdir was not created."""
  workdir = tmp_path / "run"
  with pytest.raises(ConfigError) as caught:
    pipeline.run(config, workdir)
  assert not workdir.exists()
  return str(caught.value)


# The three examples of issue 12, each refused only when its stage started.
ISSUE_EXAMPLES = {
    "target": ({"prune.target.num_key_value_heads": 8},
               "prune.target: target num_key_value_heads=8 exceeds the source model's "
               "num_key_value_heads=4"),
    "loss": ({"distill.loss.logit_loss": "kl"},
             "distill.loss: logit_loss='kl' is not supported; allowed: ('forward_kl', "),
    "task": ({"evaluate.tasks.next_line.source": "nosuch.jsonl"},
             "evaluate.tasks.next_line: task file 'nosuch.jsonl' does not exist or is a directory"),
}


def _with(config, overrides: dict):
  for key, value in overrides.items():
    node, _, leaf = key.rpartition(".")
    section = config
    for part in node.split("."):
      section = section[part]
    section[leaf] = value
  return config


@pytest.mark.parametrize("example", sorted(ISSUE_EXAMPLES))
def test_issue_examples_are_one_line_before_anything_runs(example, tmp_path):
  overrides, expected = ISSUE_EXAMPLES[example]
  message = _refused(_with(get_config("default"), overrides), tmp_path)
  assert "\n" not in message
  assert message.startswith(expected)


def test_cli_lists_every_problem_at_once_and_creates_nothing(tmp_path):
  workdir = tmp_path / "run"
  overrides = [f"--config.{key}={value}" for example in ISSUE_EXAMPLES.values()
               for key, value in example[0].items()]
  result = subprocess.run(
      [sys.executable, "-m", "minitron_jax.main", "--config=configs/default.py",
       f"--workdir={workdir}", *overrides], cwd=REPO, capture_output=True, text=True,
      timeout=300)
  assert result.returncode == 2, result.stderr
  assert "Traceback" not in result.stderr and not workdir.exists()
  lines = result.stderr.strip().splitlines()
  assert lines[0] == "error: 3 problems in the run's settings, nothing was run:"
  for (_, expected), line in zip(sorted(ISSUE_EXAMPLES.values(), key=lambda e: e[1]),
                                 sorted(lines[1:])):
    assert line.strip().startswith(expected)


@pytest.mark.parametrize("name, arg", [
    ("default", ""), ("default", "runlocal"), ("default", "family=qwen3"),
    ("default", "family=nemotron,runlocal"),
    ("nemotron4_15b_to_8b", "runlocal"), ("nemotron4_15b_to_4b", "runlocal"),
    ("llama3_1_8b_to_4b", "variant=width,runlocal"),
    ("llama3_1_8b_to_4b", "variant=depth,runlocal"), ("qwen3_30b_a3b_prune", "runlocal"),
])
def test_shipped_configs_are_valid(name, arg):
  assert _problems(get_config(name, arg)) == []


def test_every_sweep_point_is_valid():
  for path in sorted(glob.glob(str(REPO / "experiments" / "sweeps" / "*.py"))):
    name, module, arg = sweep.load(f"{path}:runlocal")
    base = module.get_config(arg)
    for point in sweep.points_of(module, base):
      assert _problems(sweep.apply(base, point)) == [], (name, sweep.point_name(point))


def test_a_paper_config_without_its_checkpoint_says_everything_missing():
  problems = _problems(get_config("nemotron4_15b_to_8b"))
  assert problems[0].startswith("model: model.hf_path is empty; this config compresses a real "
                                "nemotron4_15b checkpoint")
  assert "data: data source='tfds' needs tfds_name (e.g. 'c4/en:3.1.0')" in problems
  assert any(p.startswith("tokenizer: config.tokenizer is empty") for p in problems)


def test_a_later_stage_is_checked_against_the_shape_the_earlier_one_leaves():
  config = get_config("nemotron4_15b_to_4b", "runlocal")
  first, second = (dict(stage) for stage in config.compression)
  config.compression = (first, {**second, "target": {**second["target"], "hidden_size": 48}})
  assert _problems(config) == [
      "compression[1] (4b): target hidden_size=48 exceeds the source model's hidden_size=40"]


def test_each_iterative_round_is_checked_on_the_model_the_last_one_left():
  config = get_config("default")
  config.prune.iterative_rounds = 2
  config.prune.target.update(num_layers=2)
  config.importance.block_sizes = (1, 4)
  # Round 1 removes one of four layers; round 2 would estimate 4-layer blocks on 3 layers.
  assert _problems(config) == ["importance: block size 4 must be in [1, num_layers=3]"]


def test_contiguous_depth_pruning_needs_the_block_size_estimated():
  config = get_config("default")
  config.prune.update(contiguous_depth=True)
  config.prune.target.num_layers = 1
  (problem,) = _problems(config)
  assert problem.startswith("prune.target: block_importance for block size 3 was not estimated")
  assert "allowed: importance block_sizes including 3" in problem


def test_search_settings_are_checked_on_every_candidate():
  config = get_config("default", "runlocal")
  config.stages = ("importance", "search", "prune", "distill")
  config.search.eval_steps = (2, 8)
  config.distill.loss.update(hidden_loss="cosine", hidden_pairs=((-1, 3),))
  problems = _problems(config)
  assert "search: eval steps [8] are outside the run's steps 1..4" in problems
  # A candidate with 3 layers has 4 post-norm states: index 3 is the last there is.
  assert not any("hidden pair index 3" in p for p in problems)
  config.distill.loss.hidden_pairs = ((-1, 4),)
  assert any(p.startswith("search: hidden pair index 4 is outside the 4 post-norm states")
             for p in _problems(config))
  config.search.space.budget = 10
  assert any(p.startswith("search.space: no search candidate has 9..11 parameters")
             for p in _problems(config))


def test_hidden_pairs_are_checked_against_the_pruned_student():
  config = get_config("default")
  config.prune.target.num_layers = 2
  config.distill.loss.update(hidden_loss="cosine", hidden_pairs=((3, 3),))
  assert _problems(config) == ["distill: hidden pair index 3 is outside the 3 post-norm states"]


def test_the_tokenizer_must_fit_the_model_vocabulary(tmp_path):
  texts = [file.read_text(errors="replace") for file in corpus.stdlib_files()[:20]]
  trained = tokenizer.train_bpe_tokenizer(texts, 300, tmp_path / "tok")
  config = get_config("default")
  config.tokenizer = str(tmp_path / "tok")
  assert _problems(config) == [
      f"tokenizer: tokenizer {trained.name} has {trained.vocab_size} tokens; the model's "
      "vocab_size=256 is smaller"]


def test_paths_that_must_exist(tmp_path):
  config = get_config("default")
  config.data.update(source="jsonl", paths=(str(tmp_path / "*.jsonl"),))
  assert _problems(config) == [f"data: data paths=('{tmp_path}/*.jsonl',) matched no files"]

  config = get_config("default")
  config.model.hf_path = str(tmp_path / "nothing")
  assert _problems(config) == [f"model.hf_path: {tmp_path / 'nothing'} has no config.json; "
                               "expected a Hugging Face model directory"]

  config = get_config("default")
  config.stages = ("prune", "distill")
  assert _problems(config, tmp_path) == [
      f"stages: prune needs importance's scores at {tmp_path / 'importance' / 'scores.npz'}, "
      "which does not exist; allowed: 'importance' in stages"]
  config.stages = ("distill",)
  assert _problems(config, tmp_path) == [
      f"stages: distill needs prune's model at {tmp_path / 'prune' / 'model'}, which does not "
      "exist; allowed: 'prune' in stages"]


def test_mesh_optimizer_and_unknown_fields():
  config = get_config("default")
  config.mesh.tensor = 3
  config.distill.optimizer.accumulation_steps = 3
  config.distill.log_every = 0
  with config.distill.loss.unlocked():
    config.distill.loss.logit_los = "forward_kl"
  problems = _problems(config)
  assert problems[0] == ("mesh: mesh {'data': -1, 'fsdp': 1, 'tensor': 3, 'expert': 1} does not "
                         "divide 8 devices")
  assert problems[1].startswith("distill.loss: loss fields ['logit_los'] are unknown; allowed: "
                                "['logit_loss', ")
  assert problems[2:] == [
      "distill.optimizer: accumulation_steps=3 does not divide batch_size=16; allowed: a divisor "
      "of the batch size",
      "distill: log_every=0 must be a positive integer"]
  config.distill.update(log_every=20, max_bad_steps=-1)
  assert "distill: max_bad_steps=-1 must be a non-negative integer" in _problems(config)


def test_a_loop_setting_alone_is_one_problem_and_a_stage_s_own_steps_are_checked():
  config = get_config("default")
  config.distill.log_every = 0
  assert _problems(config) == ["distill: log_every=0 must be a positive integer"]
  config = get_config("nemotron4_15b_to_4b", "runlocal")
  config.compression = tuple({**dict(stage), "distill_steps": -1} if index else dict(stage)
                             for index, stage in enumerate(config.compression))
  assert _problems(config) == ["distill: steps=-1 must be a positive integer"]


def test_a_bad_sample_count_hides_no_shape_problem():
  config = get_config("default")
  config.prune.iterative_rounds = 2
  config.prune.target.update(num_layers=2)
  config.importance.update(num_samples=0, block_sizes=(1, 4))
  assert _problems(config) == ["importance.num_samples: 0 must be a positive integer",
                               "importance: block size 4 must be in [1, num_layers=3]"]


def test_unknown_stages_are_listed_with_the_other_problems(tmp_path):
  config = get_config("default")
  config.stages = ("check", "distil")
  config.eval_batches = 0
  message = _refused(config, tmp_path)
  assert message.splitlines() == [
      "2 problems in the run's settings, nothing was run:",
      "  stages ['distil'] are unknown; allowed: ['teacher_correction', 'check', "
      "'teacher_logits', 'importance', 'search', 'prune', 'distill', 'evaluate', 'report']",
      "  eval_batches: 0 must be a positive integer"]


def test_a_router_loss_for_a_dense_student_is_refused_from_the_command_line(tmp_path):
  workdir = tmp_path / "run"
  result = subprocess.run(
      [sys.executable, "-m", "minitron_jax.main", "--config=configs/default.py",
       f"--workdir={workdir}", "--config.distill.loss.router_aux_loss_coef=0.01"], cwd=REPO,
      capture_output=True, text=True, timeout=300)
  assert result.returncode == 2 and not workdir.exists()
  assert result.stderr.strip() == ("error: distill: router_aux_loss_coef=0.01 needs a "
                                   "mixture-of-experts student; this one (llama) is dense; "
                                   "allowed: 0.0")
