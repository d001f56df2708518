"""Importance statistics against a naive float64 reference computed from full intermediates."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minitron_jax.models import config as config_lib
from minitron_jax.compress import importance
from minitron_jax.models import model, partitioning, sharding
from minitron_jax.errors import ConfigError
from minitron_jax.compress.importance import Aggregation

ALL_AGGREGATIONS = [Aggregation(b, s) for b, s in itertools.product(importance.AGGREGATIONS,
                                                                     repeat=2)]


@pytest.fixture(scope="module")
def setup():
  config = config_lib.tiny("qwen2", num_layers=3, num_attention_heads=4, num_key_value_heads=2)
  params = model.init(config, 0)
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape), params)
  rng = np.random.RandomState(0)
  batches = []
  for i in range(3):
    tokens = rng.randint(0, 256, (4, 12))
    segment_ids = np.ones_like(tokens)
    if i == 1:  # padding, including one sample with no valid token at all
      segment_ids[0, 9:] = 0
      segment_ids[2, :] = 0
    batches.append(dict(tokens=tokens, segment_ids=segment_ids))
  return config, params, batches


def _naive(config, params, batches, aggregation: Aggregation):
  """Float64 numpy: per-token magnitudes -> seq aggregate per sample -> batch aggregate."""
  magnitudes = {"heads": [], "neurons": [], "embedding": []}
  valids = []
  for batch in batches:
    _, inter = model.apply(config, params, jnp.asarray(batch["tokens"]),
                           segment_ids=jnp.asarray(batch["segment_ids"]),
                           return_intermediates=True)
    inter = {k: np.asarray(v, np.float64) for k, v in inter.items()}
    magnitudes["heads"].append(np.linalg.norm(inter["attn_heads"], axis=-1))  # [L,B,T,N]
    magnitudes["neurons"].append(np.abs(inter["mlp_act"]))
    norms = np.stack([inter["attn_norm"], inter["mlp_norm"]], axis=1).reshape(
        -1, *inter["attn_norm"].shape[1:])
    magnitudes["embedding"].append(np.abs(np.concatenate([norms, inter["final_norm"][None]])))
    valids.append(batch["segment_ids"] != 0)
  valid = np.concatenate(valids)  # [S,T]
  keep = valid.any(1)
  results = {}
  for axis, parts in magnitudes.items():
    m = np.concatenate(parts, axis=1)[:, keep]  # [layers, samples, T, E]
    v = valid[keep][None, :, :, None]
    per_sample = []
    count = v.sum(2)
    mean = (m * v).sum(2) / count
    if aggregation.seq == "mean":
      per_sample = mean
    elif aggregation.seq == "l2":
      per_sample = np.sqrt((m**2 * v).sum(2))
    else:
      per_sample = ((m - mean[:, :, None]) ** 2 * v).sum(2) / count
    if aggregation.batch == "mean":
      results[axis] = per_sample.mean(1)
    elif aggregation.batch == "l2":
      results[axis] = np.sqrt((per_sample**2).sum(1))
    else:
      results[axis] = per_sample.var(1)
  return results


@pytest.mark.parametrize("aggregation", ALL_AGGREGATIONS, ids=lambda a: f"{a.batch}-{a.seq}")
def test_all_nine_aggregations_match_naive_reference(setup, aggregation):
  config, params, batches = setup
  scores = importance.estimate(config, params, batches)
  expected = _naive(config, params, batches, aggregation)
  assert scores.num_samples == 11
  for axis in importance.WIDTH_AXES:
    np.testing.assert_allclose(scores.per_layer(axis, aggregation), expected[axis],
                               rtol=2e-4, atol=1e-6, err_msg=axis)
  np.testing.assert_allclose(scores.embedding_channels(aggregation),
                             expected["embedding"].sum(0), rtol=2e-4)
  np.testing.assert_allclose(scores.query_groups(aggregation, 2),
                             expected["heads"].reshape(3, 2, 2).sum(-1), rtol=2e-4)


def test_scores_do_not_depend_on_batch_order_or_split(setup):
  config, params, batches = setup
  reference = importance.estimate(config, params, batches)
  reordered = importance.estimate(config, params, batches[::-1])
  merged = {k: np.concatenate([b[k] for b in batches]) for k in ("tokens", "segment_ids")}
  one_batch = importance.estimate(config, params, [merged])
  singles = importance.estimate(config, params, [{k: v[i:i + 1] for k, v in merged.items()}
                                                 for i in range(len(merged["tokens"]))])
  for other in (reordered, one_batch, singles):
    assert other.num_samples == reference.num_samples
    for aggregation in ALL_AGGREGATIONS:
      for axis in importance.WIDTH_AXES:
        np.testing.assert_allclose(other.per_layer(axis, aggregation),
                                   reference.per_layer(axis, aggregation), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(other.block_importance[1], reference.block_importance[1],
                               rtol=1e-5)


def test_block_importance_and_drop_loss_match_direct_computation(setup):
  config, params, batches = setup
  scores = importance.estimate(config, params, batches, block_sizes=(1, 2), drop_loss=True,
                               drop_block_sizes=(1, 2), drop_loss_batches=2)
  hidden, valid = [], []
  for batch in batches:
    _, inter = model.apply(config, params, jnp.asarray(batch["tokens"]),
                           segment_ids=jnp.asarray(batch["segment_ids"]),
                           return_intermediates=True)
    layers = np.concatenate([inter["layer_input"], inter["layer_output"][-1:]]).astype(np.float64)
    hidden.append(layers)
    valid.append(batch["segment_ids"] != 0)
  hidden, valid = np.concatenate(hidden, axis=1), np.concatenate(valid)

  def bi(start, n):
    a, b = hidden[start][valid], hidden[start + n][valid]
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    return 1 - cos.mean()

  for n in (1, 2):
    np.testing.assert_allclose(scores.block_importance[n],
                               [bi(i, n) for i in range(config.num_layers - n + 1)], rtol=1e-5)

  # Independent construction of "layer removed": zero its residual writes, leaving identity.
  def loss_without(start, n):
    zeroed = jax.tree.map(np.array, params)
    for name, sub in (("o_proj", "attn"), ("down_proj", "mlp")):
      zeroed["layers"][sub][name][start:start + n] = 0
    return importance.lm_loss(config, zeroed, batches[:2])

  base = importance.lm_loss(config, params, batches[:2])
  assert scores.base_loss == pytest.approx(base, rel=1e-6)
  for n in (1, 2):
    np.testing.assert_allclose(
        scores.drop_loss[n], [loss_without(i, n) - base for i in range(config.num_layers - n + 1)],
        rtol=1e-4, atol=1e-6)


def test_save_and_load_round_trip(setup, tmp_path):
  config, params, batches = setup
  scores = importance.estimate(config, params, batches, aggregation="mean,mean", block_sizes=(1, 3),
                               drop_loss=True, drop_loss_batches=1)
  scores.save(tmp_path)
  loaded = importance.Scores.load(tmp_path)
  assert loaded.aggregation == Aggregation("mean", "mean")
  assert loaded.num_samples == scores.num_samples and loaded.base_loss == scores.base_loss
  for axis in importance.WIDTH_AXES:
    np.testing.assert_array_equal(loaded.stats[axis], scores.stats[axis])
  assert sorted(loaded.block_importance) == [1, 3]
  np.testing.assert_array_equal(loaded.drop_loss[1], scores.drop_loss[1])
  assert "| layer | BI |" in (tmp_path / "summary.md").read_text()
  assert (tmp_path / "summary.json").exists()


def test_sharded_over_data_axis_matches_one_device(setup):
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices")
  config, params, batches = setup
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=4, fsdp=1, tensor=2))
  sharded = sharding.shard_params(config, params, mesh)
  result = importance.estimate(config, sharded, batches,
                               batch_sharding=lambda shape: partitioning.batch_sharding(mesh, shape))
  reference = importance.estimate(config, params, batches)
  for axis in importance.WIDTH_AXES:
    np.testing.assert_allclose(result.per_layer(axis), reference.per_layer(axis), rtol=1e-5)


@pytest.mark.parametrize("value, message", [
    ("l1,mean", "batch aggregation='l1' is not supported"),
    ("l2", "must be 'batch,seq'"),
])
def test_bad_aggregation_is_a_one_line_error(value, message):
  with pytest.raises(ConfigError, match=message):
    Aggregation.parse(value)


def test_bad_block_size_is_refused(setup):
  config, params, batches = setup
  with pytest.raises(ConfigError, match=r"block size 4 must be in \[1, num_layers=3\]"):
    importance.estimate(config, params, batches, block_sizes=(4,))
