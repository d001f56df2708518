"""The main job on the embedded default, through the same entry point the README uses."""

import json
import pathlib
import subprocess
import sys

import pytest

from minitron_jax.run import pipeline
from minitron_jax.errors import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "configs"))
import default  # noqa: E402  (configs/ is not a package)


def _small_config(**changes):
  config = default.get_config("family=nemotron")
  config.stages = ("check",)
  config.data.batch_size, config.data.seq_len, config.eval_batches = 2, 32, 2
  for key, value in changes.items():
    config[key] = value
  return config


def test_check_stage_scores_corpus_and_round_trips(tmp_path):
  lines = []
  pipeline.run(_small_config(), tmp_path, log=lines.append)
  metrics = json.loads((tmp_path / "check" / "metrics.json").read_text())
  assert metrics["family"] == "nemotron"
  assert metrics["hf_round_trip_relative_error"] == 0.0
  # An untrained byte model is close to uniform over 256 symbols.
  assert abs(metrics["validation_loss"] - 5.545) < 0.3
  assert (tmp_path / "check" / "hf" / "config.json").exists()
  assert any("batch 2/2" in line for line in lines)

  pipeline.run(_small_config(), tmp_path, log=lines.append)
  assert "skipped" in lines[-1]


def test_unknown_stage_is_refused(tmp_path):
  with pytest.raises(ConfigError, match=r"stages \['distil'\] are unknown"):
    pipeline.run(_small_config(stages=("distil",)), tmp_path)


def test_cli_user_error_is_one_line_without_traceback(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "minitron_jax.main", "--config=configs/default.py:family=gpt",
       f"--workdir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  assert "error: model: family='gpt' is not supported" in result.stderr
  assert "Traceback" not in result.stderr


def test_cli_setting_typo_is_one_line_naming_the_nearest_setting(tmp_path):
  """Issue 21: ml_collections ended this in a KeyError traceback, exit 1."""
  result = subprocess.run(
      [sys.executable, "-m", "minitron_jax.main", "--config=configs/default.py",
       "--config.distil.steps=5", f"--workdir={tmp_path / 'run'}"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  assert result.stderr.splitlines() == [
      "error: --config.distil.steps: config has no setting 'distil'; did you mean "
      "--config.distill.steps?"]
  assert not (tmp_path / "run").exists()


def test_cli_missing_config_or_workdir_is_one_line(tmp_path):
  result = subprocess.run([sys.executable, "-m", "minitron_jax.main", f"--workdir={tmp_path}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  assert result.stderr.splitlines() == [
      "error: --config must be given; allowed: --config=FILE (e.g. configs/default.py) and "
      "--workdir=DIRECTORY"]


def test_command_line_settings_must_name_settings_of_the_config_file():
  from minitron_jax import main

  config = REPO / "configs" / "default.py"
  assert main.command_line_problems(
      ["main", "--config", f"{config}:runlocal", "--config.distill.stepz=5", "--noconfig.nosuch",
       "--config.distill.steps.x=1", "--config.distill.loss.temperature=2",
       "--config.distill.stepz=6"]) == [
      "--config.distill.stepz: config.distill has no setting 'stepz'; did you mean "
      "--config.distill.steps?",
      "--config.nosuch: config has no setting 'nosuch'; allowed: compression, data, distill, "
      "eval_batches, evaluate, export_dtype, importance, mesh, model, prune, search, seed, "
      "stages, teacher_correction, teacher_logits, tokenizer",
      "--config.distill.steps.x: config.distill.steps is a value (6), not a section of settings"]
  # Settings a config file adds are settings too.
  assert main.command_line_problems(
      ["main", f"--config={REPO / 'experiments' / 'sweeps' / 'aggregation.py'}",
       "--config.replicate_seeds=(1,)"]) == []
  assert main.command_line_problems(["main", "--config=configs/nope.py:runlocal"]) == [
      "--config=configs/nope.py:runlocal: configs/nope.py is not a file; allowed: a config file "
      "such as configs/default.py"]


def test_importance_and_prune_stages_write_scores_checkpoint_and_export(tmp_path):
  from minitron_jax.checkpoints import checkpoint, hf
  from minitron_jax.compress import importance
  from minitron_jax.models import model
  import jax.numpy as jnp
  import numpy as np

  config = _small_config(stages=("importance", "prune"))
  config.importance.num_samples, config.importance.batch_size = 8, 4
  config.importance.seq_len, config.importance.drop_loss_batches = 32, 1
  config.prune.target.update(dict(num_layers=3, hidden_size=96, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=200))
  lines = []
  pipeline.run(config, tmp_path, log=lines.append)
  scores = importance.Scores.load(tmp_path / "importance")
  assert scores.num_samples == 8 and sorted(scores.block_importance) == [1, 2]
  assert scores.drop_loss[1].shape == (4,)
  saved_config, saved = checkpoint.load_model(tmp_path / "prune" / "model")
  exported_config, exported = hf.load(tmp_path / "prune" / "hf")
  assert exported_config == saved_config
  assert (saved_config.num_layers, saved_config.hidden_size, saved_config.num_attention_heads,
          saved_config.num_key_value_heads, saved_config.intermediate_size) == (3, 96, 4, 2, 200)
  tokens = jnp.asarray(np.arange(24).reshape(2, 12))
  np.testing.assert_array_equal(model.apply(saved_config, saved, tokens),
                                model.apply(exported_config, exported, tokens))
  summary = json.loads((tmp_path / "prune" / "summary.json").read_text())
  assert summary["pruned_params"] == saved_config.num_params() < summary["source_params"]
  assert any(line.startswith("[importance] batch 2") for line in lines)


def test_bad_prune_target_from_config_is_a_clean_error(tmp_path):
  config = _small_config(stages=("importance", "prune"))
  config.importance.num_samples, config.importance.batch_size = 4, 4
  config.importance.seq_len, config.importance.drop_loss = 16, False
  config.prune.target.num_layers = 9
  with pytest.raises(ConfigError, match="target num_layers=9 exceeds the source model's"):
    pipeline.run(config, tmp_path)


def test_prune_stage_with_iterative_importance(tmp_path):
  from minitron_jax.checkpoints import checkpoint

  config = _small_config(stages=("importance", "prune"))
  config.importance.num_samples, config.importance.batch_size = 4, 4
  config.importance.seq_len, config.importance.drop_loss = 16, False
  config.prune.target.update(dict(num_layers=2, intermediate_size=128))
  config.prune.iterative_rounds = 2
  lines = []
  pipeline.run(config, tmp_path, log=lines.append)
  pruned_config, _ = checkpoint.load_model(tmp_path / "prune" / "model")
  assert (pruned_config.num_layers, pruned_config.intermediate_size) == (2, 128)
  assert any("iterative importance over 2 rounds" in line for line in lines)
  # Two estimation passes: one per round.
  assert sum(line.startswith("[importance] batch 1:") for line in lines) == 3


def test_distill_stage_trains_exports_and_resumes(tmp_path):
  from minitron_jax.checkpoints import checkpoint, hf

  config = _small_config(stages=("importance", "prune", "distill"))
  config.importance.num_samples, config.importance.batch_size = 4, 4
  config.importance.seq_len, config.importance.drop_loss = 16, False
  config.prune.target.update(dict(num_layers=2, intermediate_size=128))
  config.distill.update(dict(steps=6, batch_size=4, seq_len=32, log_every=2, eval_every=3,
                             checkpoint_every=3))
  config.distill.loss.update(dict(hidden_loss="cosine", hidden_pairs=((-1, -1),)))
  lines = []
  pipeline.run(config, tmp_path, log=lines.append)
  summary = json.loads((tmp_path / "distill" / "summary.json").read_text())
  assert summary["steps"] == 6 and summary["val_ce"] > 0 and "val_hidden_loss" in summary
  records = [json.loads(l) for l in (tmp_path / "distill" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [2, 3, 4, 6]
  trained_config, _ = checkpoint.load_model(tmp_path / "distill" / "model")
  assert hf.load(tmp_path / "distill" / "hf")[0] == trained_config
  assert trained_config.num_layers == 2
  assert any("[distill] step 6/6" in line for line in lines)

  # A longer run in the same workdir resumes from the last checkpoint instead of restarting.
  (tmp_path / "distill" / "summary.json").unlink()
  config.distill.steps = 8
  lines.clear()
  pipeline.run(config, tmp_path, log=lines.append)
  assert any("resumed from step 6" in line for line in lines)
  assert json.loads((tmp_path / "distill" / "summary.json").read_text())["steps"] == 8
