"""The offline teacher store: what it holds equals the online teacher, a resumed write equals an
uninterrupted one, and a store made for another run is refused in one line."""

import dataclasses

import numpy as np
import pytest

from minitron_jax.models import config as config_lib
from minitron_jax.models import model
from minitron_jax.training import teacher_logits_store
from minitron_jax.errors import ConfigError

SEQ_LEN, ROWS, K = 16, 10, 8


def _batches(seed=0, batch=4):
  rng = np.random.RandomState(seed)
  while True:
    tokens = rng.randint(0, 256, (batch, SEQ_LEN)).astype(np.int32)
    segments = np.ones_like(tokens)
    segments[:, SEQ_LEN // 2:] = 2  # two packed documents per row
    positions = np.tile(np.arange(SEQ_LEN // 2, dtype=np.int32), (batch, 2))
    yield dict(tokens=tokens, segment_ids=segments, positions=positions)


def _meta(config, **changes):
  fields = dict(teacher="tiny seed 0", teacher_config=config.to_dict(), tokenizer="bytes",
                data=dict(source="synthetic", seed=0), seq_len=SEQ_LEN, k=K, temperature=1.0,
                dtype="bfloat16", vocab_size=config.vocab_size, num_rows=ROWS, rows_per_shard=4,
                stream_sha256="")
  return teacher_logits_store.StoreMetadata(**{**fields, **changes})


@pytest.fixture(scope="module")
def teacher():
  config = config_lib.tiny("llama")
  return config, model.init(config, seed=3)


def test_stored_rows_equal_the_online_teacher(tmp_path, teacher):
  config, params = teacher
  meta = teacher_logits_store.write(tmp_path, _meta(config), config, params, _batches(), batch_size=3)
  assert meta.num_shards == 3 and len(meta.stream_sha256) == 64
  stored = list(teacher_logits_store.dataset(tmp_path, batch_size=5))
  assert len(stored) == 2  # 10 rows, in stream order
  online = _batches()
  expected_rows = [next(online) for _ in range(3)]
  tokens = np.concatenate([b["tokens"] for b in expected_rows])[:ROWS]
  for i, batch in enumerate(stored):
    rows = slice(5 * i, 5 * i + 5)
    np.testing.assert_array_equal(batch["tokens"], tokens[rows])
    full = {key: np.concatenate([b[key] for b in expected_rows])[rows]
            for key in teacher_logits_store.ROW_KEYS}
    log_probs, indices, tail = teacher_logits_store.teacher_outputs(config, params, full, K, 1.0)
    np.testing.assert_array_equal(batch["teacher_indices"], indices)
    # The store ran the teacher 3 rows at a time, this 5: equal up to float rounding (and the
    # store's bfloat16).
    np.testing.assert_allclose(np.asarray(batch["teacher_log_probs"], np.float32), log_probs,
                               rtol=2 ** -8)
    np.testing.assert_allclose(batch["teacher_tail"], tail, rtol=1e-4)
  record_bytes = (tmp_path / "shard-00000.array_record").stat().st_size
  assert meta.bytes_per_token == 12 + K * (2 + 2) + 4  # uint16 indices for a 256-token vocab
  assert record_bytes >= 4 * SEQ_LEN * meta.bytes_per_token


def test_resumed_write_equals_an_uninterrupted_one(tmp_path, teacher):
  config, params = teacher
  whole = teacher_logits_store.write(tmp_path / "whole", _meta(config), config, params, _batches())
  partial = teacher_logits_store.write(tmp_path / "resumed", _meta(config), config, params, _batches(),
                                stop_after_shards=2)
  assert not (tmp_path / "resumed" / "metadata.json").exists() and partial.stream_sha256 == ""
  resumed = teacher_logits_store.write(tmp_path / "resumed", _meta(config), config, params, _batches())
  assert resumed == whole
  for shard in range(whole.num_shards):
    name = teacher_logits_store.shard_path(tmp_path / "whole", shard).name
    assert ((tmp_path / "whole" / name).read_bytes()
            == (tmp_path / "resumed" / name).read_bytes())
  # Complete: a rerun checks and returns it without touching the teacher.
  assert teacher_logits_store.write(tmp_path / "whole", _meta(config), config, None, iter(())) == whole


@pytest.mark.parametrize("change,message", [
    (dict(k=16), "made with k=8; this run has k=16"),
    (dict(tokenizer="tok.json"), "made with tokenizer='bytes'"),
    (dict(data=dict(source="synthetic", seed=1)), "made with data="),
    (dict(num_rows=11), "holds 10 rows; this run reads 11"),
])
def test_a_store_made_for_another_run_is_refused(tmp_path, teacher, change, message):
  config, params = teacher
  made = teacher_logits_store.write(tmp_path, _meta(config), config, params, _batches())
  wanted = dataclasses.replace(_meta(config), **change)
  with pytest.raises(ConfigError, match=message):
    made.check_matches(wanted, wanted.num_rows)


def test_a_stream_shorter_than_the_store_is_one_line(tmp_path, teacher):
  config, params = teacher
  with pytest.raises(ConfigError, match="the data stream ended before 10 rows"):
    teacher_logits_store.write(tmp_path, _meta(config), config, params,
                        [next(_batches()) for _ in range(2)])


def test_distillation_from_a_full_vocabulary_store_equals_online_distillation(tmp_path, teacher):
  """k = vocab: the stored teacher is the teacher, so one training step gives the same loss,
  gradients and updated student as running the teacher."""
  import jax

  from minitron_jax.training import distill
  from minitron_jax.objectives.losses import LossConfig

  config, params = teacher
  student_config = config.replace(num_layers=1, intermediate_size=64)
  student = model.init(student_config, seed=5)
  loss = LossConfig(temperature=2.0)
  meta = _meta(config, k=config.vocab_size, temperature=2.0, num_rows=4)
  teacher_logits_store.write(tmp_path, meta, config, params, _batches())
  batch = next(iter(teacher_logits_store.dataset(tmp_path, batch_size=4)))
  online = distill.Distiller(student_config, config, loss, distill.OptimizerConfig(), 4)
  offline = distill.Distiller(student_config, None, loss, distill.OptimizerConfig(), 4,
                              offline_teacher=True)
  row_batch = {key: batch[key] for key in teacher_logits_store.ROW_KEYS}
  exact = dict(row_batch, **dict(zip(
      ("teacher_log_probs", "teacher_indices", "teacher_tail"),
      teacher_logits_store.teacher_outputs(config, params, row_batch, config.vocab_size, 2.0))))
  trainable = online.init_state(student)["trainable"]
  (online_loss, _), online_grads = jax.value_and_grad(online.loss_terms, has_aux=True)(
      trainable, params, row_batch)
  (offline_loss, metrics), offline_grads = jax.value_and_grad(offline.loss_terms, has_aux=True)(
      trainable, None, exact)
  np.testing.assert_allclose(offline_loss, online_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * np.abs(b).max()),
               offline_grads, online_grads)
  # What the store holds: log-probabilities rounded to bfloat16, a ~1% change of this tiny KL.
  stored_loss = offline.loss_terms(trainable, None, batch)[0]
  np.testing.assert_allclose(stored_loss, online_loss, rtol=3e-2)
  assert "logit_loss" in metrics


def test_a_stored_teacher_refuses_losses_it_cannot_give():
  from minitron_jax.training import distill
  from minitron_jax.objectives.losses import LossConfig

  config = config_lib.tiny("llama")
  with pytest.raises(ConfigError, match="a stored teacher gives logits only"):
    distill.Distiller(config, None, LossConfig(hidden_loss="cosine"),
                      distill.OptimizerConfig(), 1, offline_teacher=True)
