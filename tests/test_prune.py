"""Pruning: identities, equivalence with zeroing the pruned elements, export parity, validation."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minitron_jax.models import config as config_lib
from minitron_jax.checkpoints import hf
from minitron_jax.compress import importance, prune
from minitron_jax.inputs import corpus
from minitron_jax.models import model, partitioning, sharding
from minitron_jax.errors import ConfigError

TEACHER = pathlib.Path(__file__).resolve().parents[1] / "minitron_jax" / "assets" / "stdlib_teacher"
TOKENS = jnp.asarray(np.random.RandomState(0).randint(0, 256, (3, 16)))


def _setup(family="llama", drop_loss=False, **overrides):
  shape = dict(num_layers=3, num_attention_heads=8, num_key_value_heads=4)
  config = config_lib.tiny(family, **{**shape, **overrides})
  params = model.init(config, 0)
  keys = jax.random.split(jax.random.key(1), len(jax.tree.leaves(params)))
  params = jax.tree.unflatten(jax.tree.structure(params), [
      p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(jax.tree.leaves(params), keys)])
  batches = [np.random.RandomState(i).randint(0, 256, (4, 16)) for i in range(2)]
  scores = importance.estimate(config, params, batches, drop_loss=drop_loss)
  return config, jax.tree.map(np.asarray, params), scores


def _zeroed(params, edits):
  """A copy of params with the given (path, index) slices set to zero."""
  params = jax.tree.map(np.array, params)
  for path, index in edits:
    array = params
    for key in path[:-1]:
      array = array[key]
    array[path[-1]][index] = 0
  return params


@pytest.mark.parametrize("family", config_lib.FAMILIES)
def test_keeping_everything_is_the_identity(family):
  config, params, scores = _setup(family)
  full = {k: getattr(config, k) for k in prune.target_keys(config)}
  pruned_config, pruned = prune.prune(config, params, scores, full, head_merging=True)
  assert pruned_config == config
  jax.tree.map(np.testing.assert_array_equal, pruned, params)
  np.testing.assert_array_equal(model.apply(pruned_config, pruned, TOKENS),
                                model.apply(config, params, TOKENS))


@pytest.mark.parametrize("family", ["llama", "nemotron"])
def test_pruning_neurons_equals_zeroing_them(family):
  config, params, scores = _setup(family, mlp_bias=family == "nemotron")
  pruned_config, pruned = prune.prune(config, params, scores, {"intermediate_size": 80})
  assert pruned_config.intermediate_size == 80
  kept = prune.select(config, scores, {"intermediate_size": 80}).mlp
  edits = []
  for layer in range(config.num_layers):
    dropped = np.setdiff1d(np.arange(config.intermediate_size), kept[layer])
    edits.append((("layers", "mlp", "down_proj"), (layer, dropped)))
    # The dropped neurons really are the least important ones of their layer.
    assert scores.neurons()[layer, dropped].max() <= scores.neurons()[layer, kept[layer]].min()
  np.testing.assert_allclose(model.apply(pruned_config, pruned, TOKENS),
                             model.apply(config, _zeroed(params, edits), TOKENS),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_pruning_heads_without_merging_equals_zeroing_them(family):
  config, params, scores = _setup(family)
  target = {"num_attention_heads": 4}  # 2 of each group's 2 query heads -> 1 per group
  pruned_config, pruned = prune.prune(config, params, scores, target, head_merging=False)
  assert (pruned_config.num_attention_heads, pruned_config.num_key_value_heads) == (4, 4)
  selection = prune.select(config, scores, target)
  edits = []
  for layer in range(config.num_layers):
    kept = selection.q_heads[layer]
    assert sorted(kept // 2) == list(range(4)), "one query head kept in every group"
    dropped = np.setdiff1d(np.arange(8), kept)
    edits.append((("layers", "attn", "o_proj"), (layer, dropped)))
  np.testing.assert_allclose(model.apply(pruned_config, pruned, TOKENS),
                             model.apply(config, _zeroed(params, edits), TOKENS),
                             rtol=1e-5, atol=1e-5)


def test_pruning_query_groups_equals_zeroing_their_heads():
  config, params, scores = _setup("qwen2")
  target = {"num_key_value_heads": 2, "num_attention_heads": 4}
  pruned_config, pruned = prune.prune(config, params, scores, target)
  selection = prune.select(config, scores, target)
  groups = scores.query_groups(queries_per_group=2)
  edits = []
  for layer in range(config.num_layers):
    kept_groups = selection.kv_heads[layer]
    dropped = np.setdiff1d(np.arange(4), kept_groups)
    assert groups[layer, dropped].max() <= groups[layer, kept_groups].min()
    np.testing.assert_array_equal(selection.q_heads[layer],
                                  (kept_groups[:, None] * 2 + np.arange(2)).ravel())
    edits.append((("layers", "attn", "o_proj"), (layer, (dropped[:, None] * 2 + np.arange(2)).ravel())))
  np.testing.assert_allclose(model.apply(pruned_config, pruned, TOKENS),
                             model.apply(config, _zeroed(params, edits), TOKENS),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("criterion", ["block_importance", "drop_loss"])
def test_pruning_depth_equals_making_layers_identity(criterion):
  config, params, scores = _setup("llama", drop_loss=True, sliding_window=4,
                                  sliding_window_layers=(True, False, True))
  pruned_config, pruned = prune.prune(config, params, scores, {"num_layers": 2},
                                      depth_criterion=criterion)
  layers = prune.select(config, scores, {"num_layers": 2}, depth_criterion=criterion).layers
  dropped = int(np.setdiff1d(np.arange(3), layers)[0])
  assert dropped == int(np.argmin(scores.layer_importance(criterion)))
  assert pruned_config.sliding_window_layers == tuple(
      (True, False, True)[i] for i in layers)
  edits = [(("layers", "attn", "o_proj"), dropped), (("layers", "mlp", "down_proj"), dropped)]
  np.testing.assert_allclose(model.apply(pruned_config, pruned, TOKENS),
                             model.apply(config, _zeroed(params, edits), TOKENS),
                             rtol=1e-5, atol=1e-5)


def test_contiguous_depth_removes_the_weakest_block():
  config = config_lib.tiny("llama", num_layers=4)
  params = model.init(config, 0)
  scores = importance.estimate(config, params, [np.arange(32).reshape(2, 16)], block_sizes=(1, 2))
  selection = prune.select(config, scores, {"num_layers": 2}, contiguous_depth=True)
  start = int(np.argmin(scores.block_importance[2]))
  np.testing.assert_array_equal(selection.layers,
                                [i for i in range(4) if i not in (start, start + 1)])
  with pytest.raises(ConfigError, match="block size 3 was not estimated"):
    prune.select(config, scores, {"num_layers": 1}, contiguous_depth=True)


def test_head_merging_follows_the_paper_formula():
  config, params, scores = _setup("qwen2", num_attention_heads=8, num_key_value_heads=2)
  # 4 heads per group -> 1 kept: K=1, G=4, the i range [2K-G+1, K] = [-1, 1] -> only i=1 with j=2.
  merged = prune.merge_heads(config, params, scores,
                             prune.select(config, scores, {"num_attention_heads": 2}))
  heads = scores.heads()
  for layer in range(3):
    for group in range(2):
      members = group * 4 + np.arange(4)
      ranked = members[np.argsort(-heads[layer, members], kind="stable")]
      first, second = ranked[0], ranked[1]
      q = params["layers"]["attn"]["q_proj"][layer]
      np.testing.assert_allclose(merged["layers"]["attn"]["q_proj"][layer][:, first],
                                 2 * q[:, first] - q[:, second], rtol=1e-6)
      bias = params["layers"]["attn"]["q_bias"][layer]
      np.testing.assert_allclose(merged["layers"]["attn"]["q_bias"][layer][first],
                                 2 * bias[first] - bias[second], rtol=1e-6)
      for untouched in ranked[1:]:
        np.testing.assert_array_equal(merged["layers"]["attn"]["q_proj"][layer][:, untouched],
                                      q[:, untouched])
  np.testing.assert_array_equal(merged["layers"]["attn"]["k_proj"], params["layers"]["attn"]["k_proj"])


@pytest.mark.parametrize("target, message", [
    ({"num_layers": 0}, "target num_layers=0 must be a positive integer"),
    ({"hidden_size": 65}, "target hidden_size=65 exceeds the source model's hidden_size=64"),
    ({"num_attention_heads": 6}, "num_attention_heads=6 must be a multiple of num_key_value_heads=4"),
    ({"num_key_value_heads": 1}, r"needs 8 query heads per group \(8/1\); the source has only 2"),
    ({"heads": 4}, r"target keys \['heads'\] are unknown"),
])
def test_bad_targets_are_one_line_errors(target, message):
  config, params, scores = _setup()
  with pytest.raises(ConfigError, match=message):
    prune.prune(config, params, scores, target)


ALL_AXES = dict(num_layers=2, hidden_size=40, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=72)


@pytest.mark.parametrize("family", ["llama", "qwen2", "nemotron"])
def test_all_axes_pruned_export_loads_in_transformers(tmp_path, family):
  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  config, params, scores = _setup(family)
  pruned_config, pruned = prune.prune(config, params, scores, ALL_AXES)
  assert pruned_config.head_dim * pruned_config.num_attention_heads != pruned_config.hidden_size
  assert sum(p.size for p in jax.tree.leaves(pruned)) == pruned_config.num_params()
  ours = np.asarray(model.apply(pruned_config, pruned, TOKENS))
  hf.save(tmp_path, pruned_config, pruned)
  reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  with torch.no_grad():
    theirs = reference(torch.tensor(np.asarray(TOKENS))).logits.numpy()
  assert np.max(np.abs(theirs - ours)) <= 1e-5 * np.max(np.abs(ours))


def test_iterative_pruning_reaches_the_target():
  config, params, _ = _setup("llama")
  calibration = lambda: [np.random.RandomState(i).randint(0, 256, (4, 16)) for i in range(2)]
  pruned_config, pruned, scores = prune.iterative_prune(
      config, params, calibration, ALL_AXES, rounds=2)
  for key, value in ALL_AXES.items():
    assert getattr(pruned_config, key) == value
  # The last round's scores describe the intermediate model, not the source.
  assert scores.heads().shape[0] < config.num_layers or scores.neurons().shape[1] < 128
  assert model.apply(pruned_config, pruned, TOKENS).shape == (3, 16, 256)


@pytest.mark.skipif(not (TEACHER / "config.json").exists(), reason="shipped teacher missing")
@pytest.mark.parametrize("target", [
    dict(intermediate_size=256),
    dict(num_key_value_heads=2, num_attention_heads=4),
    dict(num_layers=3, num_key_value_heads=2, num_attention_heads=4, intermediate_size=256),
], ids=["neurons", "query-groups", "depth+groups+neurons"])
def test_importance_pruning_beats_random_pruning_on_trained_teacher(target):
  config, params = hf.load(TEACHER)
  calibration = corpus.byte_windows(corpus.stdlib_bytes("train"), 16, 128, 4, seed=0)
  validation = [dict(tokens=b) for b in corpus.byte_windows(
      corpus.stdlib_bytes("validation"), 16, 129, 4, seed=1)]
  scores = importance.estimate(config, params, calibration)
  pruned_config, pruned = prune.prune(config, params, scores, target)
  informed = importance.lm_loss(pruned_config, pruned, validation)

  rng = np.random.default_rng(0)
  random_losses = []
  for _ in range(3):
    random_scores = importance.Scores(
        {k: rng.random(v.shape) for k, v in scores.stats.items()}, scores.num_samples,
        scores.num_tokens, {1: rng.random(config.num_layers)})
    random_config, random_params = prune.prune(config, params, random_scores, target)
    assert random_config == pruned_config
    random_losses.append(importance.lm_loss(random_config, random_params, validation))
  teacher_loss = importance.lm_loss(config, params, validation)
  assert teacher_loss < informed
  assert informed < min(random_losses) - 0.2, (teacher_loss, informed, random_losses)


@pytest.mark.parametrize("family,mesh_shape", [("qwen2", dict(data=2, fsdp=2, tensor=2)),
                                               ("qwen3_moe", dict(data=1, fsdp=2, expert=4))])
def test_pruning_on_the_mesh_equals_pruning_on_the_host_and_is_born_sharded(family, mesh_shape):
  """The kept indices gathered under jit from sharded params, straight into the pruned model's
  shardings: the same weights as the host path, head merging included."""
  config, params, scores = _setup(family, num_attention_heads=8, num_key_value_heads=2)
  target = {"num_layers": 2, "hidden_size": config.hidden_size // 2, "num_attention_heads": 2}
  if config.is_moe:
    target.update(num_experts=config.num_experts // 2,
                  moe_intermediate_size=config.moe_intermediate_size // 2)
  else:
    target["intermediate_size"] = config.intermediate_size // 2
  want_config, want = prune.prune(config, params, scores, target)
  mesh = partitioning.make_mesh(partitioning.MeshConfig(**mesh_shape))
  placed = sharding.shard_params(config, params, mesh)
  got_config, got = prune.prune(config, placed, scores, target,
                                shardings=lambda c: sharding.param_shardings(c, mesh))
  assert got_config == want_config
  expected_shardings = sharding.param_shardings(got_config, mesh)
  for path, leaf in jax.tree_util.tree_flatten_with_path(got)[0]:
    spec = expected_shardings
    for key in path:
      spec = spec[key.key]
    assert leaf.sharding.is_equivalent_to(spec, leaf.ndim), path
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, got),
               jax.tree.map(np.asarray, want))
