"""The main job on the embedded default, through the same entry point the README uses."""

import json
import pathlib
import subprocess
import sys

import pytest

from minitron_jax import pipeline
from minitron_jax.config import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "configs"))
import default  # noqa: E402  (configs/ is not a package)


def _small_config(**changes):
  config = default.get_config("family=nemotron")
  config.data.batch_size, config.data.seq_len, config.data.num_batches = 2, 32, 2
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
  assert "error: family='gpt' is not supported" in result.stderr
  assert "Traceback" not in result.stderr
