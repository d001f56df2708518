"""Importance and pruning of mixtures of experts: expert statistics against a per-token loop,
exact neuron slicing, every axis pruned at once exported with transformers parity."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minitron_jax.models import config as config_lib
from minitron_jax.compress import importance, prune
from minitron_jax.models import model
from minitron_jax.errors import ConfigError

TOKENS = np.random.RandomState(0).randint(0, 256, size=(3, 10))
MASK = np.ones_like(TOKENS, dtype=np.int32)
MASK[2, 6:] = 0  # padding must not count


def _random(family, seed=0, **overrides):
  config = config_lib.tiny(family, **overrides)
  params = model.init(config, seed)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return config, jax.tree.unflatten(treedef, [
      leaf + 0.1 * jax.random.normal(key, leaf.shape, leaf.dtype)
      for leaf, key in zip(leaves, keys)])


def _scores(config, params):
  return importance.estimate(config, params, [dict(tokens=TOKENS, segment_ids=MASK)])


@pytest.mark.parametrize("family", config_lib.MOE_FAMILIES)
def test_expert_statistics_match_a_per_token_loop(family):
  config, params = _random(family)
  scores = _scores(config, params)
  _, inter = model.apply(config, params, jnp.asarray(TOKENS),
                         segment_ids=jnp.asarray(MASK), return_intermediates=True)
  index, weight = np.asarray(inter["expert_index"]), np.asarray(inter["expert_weight"], np.float64)
  act, out = np.asarray(inter["expert_act"], np.float64), np.asarray(inter["expert_output"],
                                                                     np.float64)
  layers, experts, width = config.num_layers, config.num_experts, config.moe_intermediate_size
  tokens = np.zeros((layers, experts))
  contribution = np.zeros((layers, experts))
  neurons = np.zeros((layers, 2, experts, width))
  for l in range(layers):
    for b, t in zip(*np.nonzero(MASK)):
      for k in range(config.num_experts_per_tok):
        e, w = index[l, b, t, k], weight[l, b, t, k]
        tokens[l, e] += 1
        contribution[l, e] += w * np.linalg.norm(out[l, b, t, k])
        neurons[l, 0, e] += np.abs(w * act[l, b, t, k])
        neurons[l, 1, e] += np.square(w * act[l, b, t, k])
  np.testing.assert_array_equal(scores.stats["expert_tokens"], tokens)
  np.testing.assert_allclose(scores.stats["expert_contribution"], contribution, rtol=1e-5)
  np.testing.assert_allclose(scores.stats["expert_neurons"], neurons, rtol=1e-4, atol=1e-9)
  assert tokens.sum() == MASK.sum() * config.num_experts_per_tok * layers
  np.testing.assert_allclose(scores.experts("frequency").sum(-1), config.num_experts_per_tok)
  assert np.all(scores.experts() > 0)
  np.testing.assert_allclose(scores.expert_neurons("l2,mean"), np.sqrt(neurons[:, 1]), rtol=1e-5)
  np.testing.assert_allclose(scores.expert_neurons("mean,mean"),
                             neurons[:, 0] / np.maximum(tokens, 1)[..., None], rtol=1e-4)
  assert "neurons" not in scores.stats
  if config.shared_expert_intermediate_size:
    assert scores.shared_neurons().shape == (layers, config.shared_expert_intermediate_size)


def test_scores_round_trip_through_files(tmp_path):
  config, params = _random("qwen2_moe")
  scores = _scores(config, params)
  scores.save(tmp_path)
  loaded = importance.Scores.load(tmp_path)
  np.testing.assert_array_equal(loaded.expert_neurons(), scores.expert_neurons())
  np.testing.assert_array_equal(loaded.shared_neurons(), scores.shared_neurons())
  assert "expert_contribution_per_layer" in scores.summary()


@pytest.mark.parametrize("family", config_lib.MOE_FAMILIES)
def test_keeping_everything_is_the_identity(family):
  config, params = _random(family)
  pruned_config, pruned = prune.prune(config, params, _scores(config, params), {})
  assert pruned_config == config
  jax.tree.map(np.testing.assert_array_equal, pruned, jax.tree.map(np.asarray, params))


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe"])
def test_expert_neurons_pruned_equal_their_contributions_zeroed(family):
  """Dropping an expert's neuron is exactly zeroing its down_proj row: each expert keeps its
  own neurons, and routing does not change."""
  config, params = _random(family)
  scores = _scores(config, params)
  target = dict(moe_intermediate_size=20)
  if config.shared_expert_intermediate_size:
    target["shared_expert_intermediate_size"] = 30
  selection = prune.select(config, scores, target)
  pruned_config, pruned = prune.apply_selection(config, params, selection)
  assert pruned_config.moe_intermediate_size == 20
  down = np.array(params["layers"]["moe"]["down_proj"])  # [L,E,F,D]
  keep = np.zeros(down.shape[:3], bool)
  np.put_along_axis(keep, selection.moe_mlp, True, axis=2)
  zeroed = jax.tree.map(np.asarray, params)
  zeroed["layers"]["moe"]["down_proj"] = down * keep[..., None]
  if config.shared_expert_intermediate_size:
    shared_down = np.array(params["layers"]["moe"]["shared"]["down_proj"])  # [L,Fs,D]
    kept_shared = np.zeros(shared_down.shape[:2], bool)
    np.put_along_axis(kept_shared, selection.shared_mlp, True, axis=1)
    zeroed["layers"]["moe"]["shared"]["down_proj"] = shared_down * kept_shared[..., None]
  tokens = jnp.asarray(TOKENS)
  np.testing.assert_allclose(model.apply(pruned_config, pruned, tokens),
                             model.apply(config, zeroed, tokens), rtol=1e-5, atol=1e-5)
  # Each expert ranked its own neurons: kept sets differ between experts.
  assert len({tuple(row) for row in selection.moe_mlp[0]}) > 1


def test_experts_keep_their_router_columns_and_the_top_k_is_clamped():
  config, params = _random("qwen3_moe")  # 6 experts, 2 per token
  scores = _scores(config, params)
  selection = prune.select(config, scores, dict(num_experts=1))
  ranked = np.argsort(-scores.experts(), axis=-1, kind="stable")[:, :1]
  np.testing.assert_array_equal(selection.experts, np.sort(ranked, -1))
  with pytest.warns(UserWarning, match="every token now goes to all 1"):
    pruned_config, pruned = prune.apply_selection(config, params, selection)
  assert (pruned_config.num_experts, pruned_config.num_experts_per_tok) == (1, 1)
  router = np.asarray(params["layers"]["moe"]["router"])
  np.testing.assert_array_equal(pruned["layers"]["moe"]["router"],
                                np.stack([router[l][:, selection.experts[l]]
                                          for l in range(config.num_layers)]))
  frequency = prune.select(config, scores, dict(num_experts=3), expert_criterion="frequency")
  np.testing.assert_array_equal(
      frequency.experts, np.sort(np.argsort(-scores.experts("frequency"), -1,
                                            kind="stable")[:, :3], -1))


@pytest.mark.parametrize("target,message", [
    (dict(intermediate_size=64), "do not apply to a mixture of experts"),
    (dict(num_experts=7), "exceeds the source model's num_experts=6"),
    (dict(shared_expert_intermediate_size=8), "do not apply to a mixture of experts"),
])
def test_bad_moe_targets_are_one_line_errors(target, message):
  config = config_lib.tiny("qwen3_moe")
  with pytest.raises(ConfigError, match=message):
    prune.validate_target(config, target)


def test_dense_model_refuses_expert_targets_and_dense_scores_refuse_expert_pruning():
  with pytest.raises(ConfigError, match="do not apply to a dense model"):
    prune.validate_target(config_lib.tiny("llama"), dict(num_experts=2))
  config, params = _random("llama")
  with pytest.raises(ConfigError, match="hold no expert statistics"):
    _scores(config, params).experts()
