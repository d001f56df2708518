"""The main job with an offline teacher: the teacher_logits stage stores the stream the online
run reads, search and distill train from it, and a store made for other settings is refused."""

import itertools
import json

import numpy as np
import pytest

from minitron_jax.checkpoints import build
from minitron_jax.inputs import data
from minitron_jax.run import pipeline, plan, run_config
from minitron_jax.training import teacher_logits_store
from minitron_jax.errors import ConfigError


def _config(**teacher_logits):
  cfg = run_config.base_config()
  run_config.runlocal(cfg)
  cfg.stages = ("teacher_logits", "importance", "search", "prune", "distill")
  cfg.teacher_logits.update(k=32, rows_per_shard=8, **teacher_logits)
  return cfg


def test_search_and_distill_run_from_the_stored_stream(tmp_path):
  cfg = _config()
  lines = []
  pipeline.run(cfg, tmp_path, log=lines.append)
  assert (tmp_path / "distill" / "model").is_dir()
  assert any("stored top-k" in line for line in lines if line.startswith("[distill]"))
  summary = json.loads((tmp_path / "teacher_logits" / "summary.json").read_text())
  rows = max(cfg.distill.steps, cfg.search.retrain_steps) * cfg.distill.batch_size
  assert summary["train"]["rows"] == rows and summary["k"] == 32

  # The stored rows are the online run's rows, in its order, with the online teacher's top-k.
  config, params = build.load_model(cfg.model)
  planned = plan.build_plan(cfg, tmp_path)
  tok = planned.load_tokenizer(config.vocab_size)
  online = data.make_iterator(planned.settings_of("distill").data, tok, "train")
  stored = teacher_logits_store.dataset(tmp_path / "teacher_logits" / "train", cfg.distill.batch_size)
  for expected, got in itertools.islice(zip(online, stored), rows // cfg.distill.batch_size):
    for key in teacher_logits_store.ROW_KEYS:
      np.testing.assert_array_equal(got[key], expected[key])
  log_probs, indices, _ = teacher_logits_store.teacher_outputs(config, params, expected, 32, 1.0)
  np.testing.assert_array_equal(got["teacher_indices"], indices)
  np.testing.assert_allclose(np.asarray(got["teacher_log_probs"], np.float32), log_probs,
                             rtol=2 ** -8, atol=1e-6)

  # Rerun with another temperature: refused before any stage runs, in one line.
  cfg.distill.loss.temperature = 2.0
  with pytest.raises(ConfigError) as caught:
    pipeline.run(cfg, tmp_path, log=lines.append)
  assert "made with temperature=1.0; this run has temperature=2.0" in str(caught.value)
  assert "\n" not in str(caught.value)


def test_losses_a_store_cannot_give_are_refused_before_the_run(tmp_path):
  cfg = _config()
  cfg.distill.loss.hidden_loss = "cosine"
  with pytest.raises(ConfigError, match="a stored teacher gives logits only"):
    pipeline.run(cfg, tmp_path)
  assert not (tmp_path / "teacher_logits").exists()
