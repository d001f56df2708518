"""Model behaviour that needs no reference implementation: packing, dtypes, remat, configs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minitron_jax.models import config as config_lib
from minitron_jax.models import model
from minitron_jax.errors import ConfigError


def _relative_error(actual, expected) -> float:
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def _scaled_random_params(config, seed=0):
  """Random params with larger weights than init, so every layer visibly changes the output."""
  params = model.init(config, seed)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree.unflatten(treedef, [
      leaf + 0.1 * jax.random.normal(key, leaf.shape, leaf.dtype) for leaf, key in zip(leaves, keys)])


@pytest.mark.parametrize("family", config_lib.FAMILIES)
def test_packed_segments_equal_separate_sequences(family):
  config = config_lib.tiny(family, sliding_window=None)
  params = _scaled_random_params(config)
  rng = np.random.RandomState(1)
  first, second = rng.randint(0, 256, (1, 5)), rng.randint(0, 256, (1, 7))
  packed = jnp.asarray(np.concatenate([first, second], axis=1))
  segments = jnp.asarray([[1] * 5 + [2] * 7])
  positions = jnp.asarray([list(range(5)) + list(range(7))])
  logits = model.apply(config, params, packed, segment_ids=segments, positions=positions)
  np.testing.assert_allclose(logits[:, :5], model.apply(config, params, jnp.asarray(first)),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits[:, 5:], model.apply(config, params, jnp.asarray(second)),
                             rtol=1e-5, atol=1e-5)


def _same_routing(config, params, low_config, low_params, tokens) -> np.ndarray:
  """[B,T]: tokens routed to the same experts in every layer (all of them for dense models).

  Routing is discontinuous: bf16 rounding may swap a token's near-tied experts, and that
  token's output then differs by far more than rounding, as in any MoE implementation."""
  if not config.is_moe:
    return np.ones(tokens.shape, bool)
  routed = [np.sort(np.asarray(model.apply(c, p, tokens, return_intermediates=True)[1]
                               ["expert_index"]), -1)
            for c, p in ((config, params), (low_config, low_params))]
  return np.all(routed[0] == routed[1], axis=(0, -1))


@pytest.mark.parametrize("family", config_lib.FAMILIES)
def test_bfloat16_compute_stays_close_to_float32(family):
  config = config_lib.tiny(family)
  params = _scaled_random_params(config)
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 256, (2, 16)))
  reference = model.apply(config, params, tokens)
  low_config = config.replace(dtype="bfloat16")
  bf16 = model.apply(low_config, params, tokens)
  assert bf16.dtype == jnp.float32
  same = _same_routing(config, params, low_config, params, tokens)
  assert same.mean() >= 0.9
  assert _relative_error(np.asarray(bf16)[same], np.asarray(reference)[same]) < 5e-2
  bf16_params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
  low_config = config.replace(dtype="bfloat16", param_dtype="bfloat16")
  both = model.apply(low_config, bf16_params, tokens)
  same = _same_routing(config, params, low_config, bf16_params, tokens)
  assert same.mean() >= 0.9
  assert _relative_error(np.asarray(both)[same], np.asarray(reference)[same]) < 5e-2
  # bf16 must actually be used: results differ from fp32 beyond fp32 rounding.
  assert _relative_error(bf16, reference) > 1e-5


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_gives_identical_values_and_gradients(policy):
  config = config_lib.tiny("llama")
  params = _scaled_random_params(config)
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 256, (2, 8)))

  def loss(params, cfg):
    return jnp.mean(jax.nn.logsumexp(model.apply(cfg, params, tokens), axis=-1))

  value, grads = jax.value_and_grad(loss)(params, config)
  remat_value, remat_grads = jax.value_and_grad(loss)(params, config.replace(remat=policy))
  np.testing.assert_allclose(remat_value, value, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               remat_grads, grads)


def test_init_matches_abstract_shapes_and_param_count():
  for family in config_lib.FAMILIES:
    config = config_lib.tiny(family)
    params = model.init(config, 0)
    shapes = jax.tree.map(lambda x: (x.shape, x.dtype), params)
    assert shapes == jax.tree.map(lambda x: (x.shape, x.dtype), model.abstract_params(config))
    assert sum(x.size for x in jax.tree.leaves(params)) == config.num_params()
    axes = model.logical_axes(config)
    jax.tree.map(lambda names, leaf: len(names) == leaf.ndim or pytest.fail(str(names)),
                 axes, params, is_leaf=lambda x: isinstance(x, tuple))


def test_building_the_same_model_again_reuses_its_program(compiled):
  # Every stage of a run loads its source afresh: one compile, not one per stage.
  config = config_lib.tiny("llama")
  first, again = model.init(config, 3), model.init(config, 3)
  assert compiled().count("jit(_create)") == 1
  jax.tree.map(np.testing.assert_array_equal, first, again)
  assert not np.array_equal(model.init(config, 4)["embed"], first["embed"])


@pytest.mark.parametrize("preset, published", [
    ("llama3_2_1b", 1_235_814_400),  # Llama-3.2-1B model card
    ("llama3_1_8b", 8_030_261_248),  # Llama-3.1-8B model card
])
def test_preset_param_counts_match_published(preset, published):
  config = config_lib.preset(preset)
  assert config.num_params() == published
  abstract = model.abstract_params(config)
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract)) == published


@pytest.mark.parametrize("change, message", [
    (dict(num_key_value_heads=3), "num_attention_heads=4 must be a multiple of num_key_value_heads=3"),
    (dict(hidden_size=0), "hidden_size=0 must be a positive integer"),
    (dict(activation="tanh"), "activation='tanh' is not supported"),
    (dict(dtype="float16"), "dtype='float16' is not supported"),
    (dict(partial_rotary_factor=0.1), "rotary dim 1"),
    (dict(sliding_window_layers=(True,)), "sliding_window_layers has 1 entries; num_layers=2"),
])
def test_config_errors_name_the_value(change, message):
  with pytest.raises(ConfigError, match=message):
    config_lib.tiny("llama", **change)


def test_one_billion_parameter_forward_on_cpu():
  config = config_lib.preset("llama3_2_1b")
  params = model.init(config, 0)
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, config.vocab_size, (1, 16)))
  logits = model.apply(config, params, tokens)
  assert logits.shape == (1, 16, config.vocab_size)
  assert bool(jnp.all(jnp.isfinite(logits)))
  assert float(jnp.std(logits)) > 0


def test_flops_count_llama_1b_by_hand():
  from minitron_jax.models import flops

  config = config_lib.preset("llama3_2_1b")
  # Per layer: q 2048x2048, k and v 2048x512, o 2048x2048, MLP 3 x 2048x8192; head 2048x128256.
  # Norm scales (2 per layer, 1 final) count too; the tied embedding is the head.
  per_layer = 2048 * 2048 * 2 + 2048 * 512 * 2 + 3 * 2048 * 8192 + 2 * 2048
  assert flops.matmul_params(config) == 16 * per_layer + 2048 + 2048 * 128256
  attention = 4 * 16 * 1024 * 32 * 64
  assert flops.forward_flops_per_token(config, 1024) == 2 * flops.matmul_params(config) + attention
  student = config.replace(num_layers=8)
  assert flops.distillation_flops_per_token(student, config, 1024) == (
      flops.forward_flops_per_token(config, 1024) + 3 * flops.forward_flops_per_token(student, 1024))


def test_flops_of_a_mixture_count_its_routed_experts_only():
  from minitron_jax.models import flops

  config = config_lib.PRESETS["qwen3_30b_a3b"]()
  # Per layer: q and o 2048 x 32 x 128, k and v 2048 x 4 x 128, q/k norms 2 x 128, 2 norms of
  # 2048, then 8 of the 128 experts (3 x 2048 x 768 each) and the router 2048 x 128.
  per_layer = (2 * 2048 * 32 * 128 + 2 * 2048 * 4 * 128 + 2 * 128 + 2 * 2048
               + 8 * 3 * 2048 * 768 + 2048 * 128)
  assert flops.matmul_params(config) == 48 * per_layer + 2048 + 2048 * 151936  # untied head
  assert flops.forward_flops_per_token(config, 1) < 0.2 * 2 * config.num_params()
