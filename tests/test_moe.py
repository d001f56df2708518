"""Mixtures of experts: parity with transformers' Mixtral / Qwen2-MoE / Qwen3-MoE, the grouped
dispatch against a dense reference, and the router's load-balancing loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_reference import (assert_close_relative, assert_export_round_trip, hf_config, hf_logits,
                          hf_model, load_saved_reference, torch, transformers)
from minitron_jax.models import config as config_lib
from minitron_jax.checkpoints import hf
from minitron_jax.models import model, moe
from minitron_jax.errors import ConfigError

TOKENS = np.random.RandomState(0).randint(0, 128, size=(2, 12))
FP32_TOLERANCE = 1e-5


def moe_hf_config(family: str, **overrides):
  """4-6 experts of width 24, 2 per token; head_dim 16 != hidden 48 / 4 heads."""
  fields = dict(num_experts_per_tok=2)
  if family == "mixtral":
    fields.update(num_local_experts=4, intermediate_size=24)
  else:
    fields.update(num_experts=6, moe_intermediate_size=24, norm_topk_prob=True)
  if family == "qwen2_moe":
    fields.update(shared_expert_intermediate_size=40, num_experts=4, norm_topk_prob=False)
  fields.update(overrides)
  return hf_config(family, **fields)


def _round_trip(tmp_path, hf_cfg):
  return load_saved_reference(tmp_path / "hf", hf_cfg, TOKENS)


@pytest.mark.parametrize("family,overrides", [
    ("mixtral", {}),
    ("mixtral", dict(sliding_window=5)),
    ("qwen3_moe", {}),
    ("qwen3_moe", dict(norm_topk_prob=False, num_experts_per_tok=3)),
    ("qwen2_moe", {}),
], ids=["mixtral", "mixtral-window", "qwen3_moe", "qwen3_moe-unnormalised-top3", "qwen2_moe"])
def test_load_matches_transformers_and_export_reloads(tmp_path, family, overrides):
  reference, config, params, logits = _round_trip(tmp_path, moe_hf_config(family, **overrides))
  assert config.family == family and config.is_moe
  assert_close_relative(logits, hf_logits(reference, TOKENS), FP32_TOLERANCE)
  assert config.num_params() == sum(p.numel() for p in reference.parameters())

  assert_export_round_trip(tmp_path / "export", config, params, TOKENS, logits, FP32_TOLERANCE)


def test_padded_batch_matches_transformers(tmp_path):
  reference, config, params, _ = _round_trip(tmp_path, moe_hf_config("qwen3_moe"))
  mask = np.ones_like(TOKENS)
  mask[1, 8:] = 0
  ours = np.asarray(model.apply(config, params, jnp.asarray(TOKENS),
                                segment_ids=jnp.asarray(mask, jnp.int32)))
  theirs = hf_logits(reference, TOKENS, mask)
  assert_close_relative(ours[mask == 1], theirs[mask == 1], FP32_TOLERANCE)


def _dense_reference(x, weights, indices, gate, up, down, activation):
  """Every expert on every token (float64), kept only where routed: what dispatch must equal."""
  x64 = np.asarray(x, np.float64)
  hidden = activation(np.einsum("btd,edf->btef", x64, gate)) * np.einsum("btd,edf->btef", x64, up)
  outputs = np.einsum("btef,efd->bted", hidden, down)  # [B,T,E,D]
  chosen = np.take_along_axis(outputs, np.asarray(indices)[..., None], axis=2)  # [B,T,K,D]
  return np.einsum("btkd,btk->btd", chosen, np.asarray(weights, np.float64))


def test_grouped_dispatch_equals_dense_reference_values_and_gradients():
  keys = jax.random.split(jax.random.key(0), 5)
  b, t, d, e, f, k = 2, 7, 8, 5, 6, 2
  x = jax.random.normal(keys[0], (b, t, d))
  gate, up = (jax.random.normal(keys[i], (e, d, f)) / 3 for i in (1, 2))
  down = jax.random.normal(keys[3], (e, f, d)) / 3
  logits = jax.random.normal(keys[4], (b, t, e))
  weights, indices = moe.route(logits, k, normalize=True)
  np.testing.assert_allclose(np.sum(weights, -1), 1.0, rtol=1e-6)

  def ours(gate, up, down, implementation="grouped"):
    outputs, _ = moe.experts(x, indices, gate, up, down, jax.nn.silu,
                             implementation=implementation)
    return jnp.einsum("BTKD,BTK->BTD", outputs, weights)

  silu = lambda v: v / (1 + np.exp(-v))
  expected = _dense_reference(x, weights, indices, np.asarray(gate, np.float64),
                              np.asarray(up, np.float64), np.asarray(down, np.float64), silu)
  np.testing.assert_allclose(ours(gate, up, down), expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ours(gate, up, down, "capacity"), expected, rtol=1e-5, atol=1e-5)

  def dense(gate, up, down):  # the same loss through every expert, masked: independent of sorting
    h = jax.nn.silu(jnp.einsum("btd,edf->btef", x, gate)) * jnp.einsum("btd,edf->btef", x, up)
    mask = jnp.sum(jax.nn.one_hot(indices, e) * weights[..., None], axis=2)  # [B,T,E]
    return jnp.einsum("btef,efd,bte->btd", h, down, mask)

  loss = lambda fn: lambda *w: jnp.sum(jnp.sin(fn(*w)))
  grads = jax.grad(loss(ours), argnums=(0, 1, 2))(gate, up, down)
  expected_grads = jax.grad(loss(dense), argnums=(0, 1, 2))(gate, up, down)
  capacity_grads = jax.grad(loss(lambda *w: ours(*w, "capacity")), argnums=(0, 1, 2))(
      gate, up, down)
  for got, also, want in zip(grads, capacity_grads, expected_grads):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(also, want, rtol=1e-5, atol=1e-6)
  unrouted = np.setdiff1d(np.arange(e), np.asarray(indices))
  for expert in unrouted:  # an expert no token picked gets no gradient
    assert not np.any(np.asarray(grads[0][expert]))


def test_load_balancing_loss_matches_transformers(tmp_path):
  reference = hf_model(moe_hf_config("qwen3_moe"))
  reference.config.output_router_logits = True
  mask = np.ones_like(TOKENS)
  mask[0, 9:] = 0
  with torch.no_grad():
    out = reference(torch.tensor(TOKENS), attention_mask=torch.tensor(mask),
                    output_router_logits=True)
  logits = np.stack([r.float().numpy().reshape(*TOKENS.shape, -1) for r in out.router_logits])
  ours = moe.load_balancing_loss(jnp.asarray(logits), 2, jnp.asarray(mask, bool))
  np.testing.assert_allclose(float(ours), float(out.aux_loss), rtol=1e-5)
  even = moe.load_balancing_loss(jnp.zeros((3, 2, 4, 6)), 2)
  np.testing.assert_allclose(float(even), 2.0, rtol=1e-6)  # K at perfectly even routing


def test_router_logits_from_our_model_match_transformers(tmp_path):
  reference, config, params, _ = _round_trip(tmp_path, moe_hf_config("mixtral"))
  _, inter = model.apply(config, params, jnp.asarray(TOKENS), return_intermediates=True)
  with torch.no_grad():
    out = reference(torch.tensor(TOKENS), output_router_logits=True)
  theirs = np.stack([r.float().numpy().reshape(*TOKENS.shape, -1) for r in out.router_logits])
  assert_close_relative(inter["router_logits"], theirs, FP32_TOLERANCE)
  assert inter["expert_act"].shape == (config.num_layers, *TOKENS.shape, 2, 24)


def test_bfloat16_compute_tracks_float32():
  config = config_lib.tiny("qwen2_moe")
  params = model.init(config, seed=1)
  tokens = jnp.asarray(TOKENS % config.vocab_size)
  exact = np.asarray(model.apply(config, params, tokens))
  low = np.asarray(model.apply(config.replace(dtype="bfloat16"), params, tokens))
  assert_close_relative(low, exact, 3e-2)


@pytest.mark.parametrize("fields,message", [
    (dict(num_experts=4, num_experts_per_tok=5, moe_intermediate_size=8),
     "num_experts_per_tok=5 must be in [1, num_experts=4]"),
    (dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=0),
     "moe_intermediate_size=0 must be positive with experts"),
    (dict(num_experts_per_tok=2), "need num_experts > 0"),
])
def test_bad_moe_fields_are_one_line_errors(fields, message):
  with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
    config_lib.tiny("llama", **fields)


def test_dense_layers_among_sparse_are_refused():
  with pytest.raises(ConfigError, match="mlp_only_layers"):
    hf.config_from_hf(moe_hf_config("qwen3_moe", mlp_only_layers=[1]).to_dict())


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "qwen2_moe"])
def test_pruned_on_every_axis_exports_with_parity(tmp_path, family):
  from minitron_jax.compress import importance, prune

  reference, config, params, _ = _round_trip(tmp_path, moe_hf_config(family))
  scores = importance.estimate(config, params, [TOKENS, TOKENS[::-1]],
                               block_sizes=(1,))
  target = dict(num_layers=2, hidden_size=40, num_attention_heads=2, num_key_value_heads=1,
                num_experts=3, moe_intermediate_size=16)
  if family == "qwen2_moe":
    target["shared_expert_intermediate_size"] = 24
  pruned_config, pruned = prune.prune(config, params, scores, target)
  assert (pruned_config.num_experts, pruned_config.moe_intermediate_size) == (3, 16)
  assert pruned_config.num_params() == sum(np.size(leaf) for leaf in jax.tree.leaves(pruned))
  logits = np.asarray(model.apply(pruned_config, pruned, jnp.asarray(TOKENS)))
  hf.save(tmp_path / "pruned", pruned_config, pruned)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
  assert_close_relative(hf_logits(reloaded, TOKENS), logits, FP32_TOLERANCE)
  assert hf.load_config(tmp_path / "pruned") == pruned_config.replace(
      intermediate_size=hf.load_config(tmp_path / "pruned").intermediate_size)


def _capacity_reference(x, indices, weights, gate, up, down, slots):
  """Per-token loop: an expert takes pairs in (token, k) order until it holds `slots`."""
  x64 = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
  flat_index = np.asarray(indices).reshape(len(x64), -1)
  flat_weight = np.asarray(weights, np.float64).reshape(len(x64), -1)
  taken = np.zeros(gate.shape[0], int)
  out = np.zeros_like(x64)
  silu = lambda v: v / (1 + np.exp(-v))
  for token in range(len(x64)):
    for k in range(flat_index.shape[1]):
      e = flat_index[token, k]
      if taken[e] < slots:
        taken[e] += 1
        hidden = silu(x64[token] @ gate[e]) * (x64[token] @ up[e])
        out[token] += flat_weight[token, k] * hidden @ down[e]
  return out.reshape(x.shape)


@pytest.mark.parametrize("factor", [0.5, 1.0, 2.5])  # 2.5 = E/K: nothing dropped
def test_capacity_dispatch_drops_overflow_as_a_per_token_loop(factor):
  keys = jax.random.split(jax.random.key(1), 5)
  b, t, d, e, f, k = 2, 9, 8, 5, 6, 2
  x = jax.random.normal(keys[0], (b, t, d))
  gate, up = (np.asarray(jax.random.normal(keys[i], (e, d, f)), np.float64) / 3 for i in (1, 2))
  down = np.asarray(jax.random.normal(keys[3], (e, f, d)), np.float64) / 3
  weights, indices = moe.route(jax.random.normal(keys[4], (b, t, e)), k, normalize=False)
  as32 = lambda a: jnp.asarray(a, jnp.float32)
  outputs, _ = moe.experts(x, indices, as32(gate), as32(up), as32(down), jax.nn.silu, factor)
  ours = np.asarray(jnp.einsum("BTKD,BTK->BTD", outputs, weights))
  slots = moe.capacity(b * t, k, e, factor)
  np.testing.assert_allclose(ours, _capacity_reference(x, indices, weights, gate, up, down, slots),
                             rtol=1e-5, atol=1e-6)
  if factor == 2.5:
    exact, _ = moe.experts(x, indices, as32(gate), as32(up), as32(down), jax.nn.silu,
                           implementation="grouped")
    np.testing.assert_allclose(outputs, exact, rtol=1e-5, atol=1e-6)


def test_capacity_dispatch_in_the_model_and_its_gradients():
  config = config_lib.tiny("qwen3_moe")  # 6 experts, 2 per token: factor 3 never drops
  params = model.init(config, seed=2)
  tokens = jnp.asarray(TOKENS % config.vocab_size)
  roomy = config.replace(moe_capacity_factor=3.0)
  loss = lambda c: lambda p: jnp.sum(jnp.sin(model.apply(c, p, tokens)))
  np.testing.assert_allclose(model.apply(roomy, params, tokens),
                             model.apply(config, params, tokens), rtol=1e-5, atol=1e-6)
  grads, exact_grads = (jax.grad(loss(c))(params) for c in (roomy, config))
  jax.tree.map(lambda a, b: assert_close_relative(a, b, 1e-5), grads, exact_grads)
  tight = model.apply(config.replace(moe_capacity_factor=0.5), params, tokens)
  assert np.all(np.isfinite(tight)) and not np.allclose(tight, model.apply(config, params, tokens))
