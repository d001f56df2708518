"""Hybrid layer stacks (Nemotron-H): per-kind stacks scanned with a switch, against transformers'
NemotronHForCausalLM in logits and gradients on tiny random models of several layer patterns."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_reference import assert_close_relative, torch, transformers
from test_mamba2 import mamba_config_from_hf, mixer_params_from_hf
from minitron_jax.errors import ConfigError
from minitron_jax.models import config as config_lib
from minitron_jax.models import hybrid, model, partitioning, sharding

FP32_TOLERANCE = 1e-5
PATTERNS = {
    "mamba_mlp_attention": ["linear_attention", "mlp", "full_attention", "linear_attention", "mlp"],
    "mamba_only": ["linear_attention", "linear_attention"],
    "attention_first": ["full_attention", "linear_attention", "mlp", "linear_attention"],
}
TOKENS = np.random.RandomState(0).randint(0, 64, size=(2, 13))


def _hf_model(pattern, seed=0):
  config = transformers.NemotronHConfig(
      vocab_size=64, hidden_size=24, layers_block_type=pattern, num_attention_heads=4,
      num_key_value_heads=2, head_dim=8, intermediate_size=40, mamba_num_heads=4,
      mamba_head_dim=6, n_groups=2, ssm_state_size=5, conv_kernel=4, chunk_size=8,
      time_step_limit=(0.0, float("inf")), layer_norm_epsilon=1e-5, mlp_hidden_act="relu2")
  torch.manual_seed(seed)
  hf = transformers.NemotronHForCausalLM(config).eval()
  with torch.no_grad():
    for name, param in hf.named_parameters():
      param.add_(0.1 * torch.randn_like(param))
  return config, hf


def _ours(config, hf):
  """Our config and params from the transformers model (as a Nemotron-H import must read them)."""
  kinds = {"linear_attention": "mamba", "full_attention": "attention", "mlp": "mlp"}
  mamba = mamba_config_from_hf(config)
  ours = config_lib.ModelConfig(
      family="nemotron", vocab_size=config.vocab_size, hidden_size=config.hidden_size,
      num_layers=len(config.layers_block_type), num_attention_heads=config.num_attention_heads,
      num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim,
      intermediate_size=config.intermediate_size, activation="relu2", gated_mlp=False,
      norm="rms", norm_eps=config.layer_norm_epsilon, rotary=False,
      layer_kinds=tuple(kinds[k] for k in config.layers_block_type),
      mamba=mamba if "mamba" in (kinds[k] for k in config.layers_block_type) else None)
  w = {k: v.detach().numpy().astype(np.float32) for k, v in hf.state_dict().items()}
  d = config.hidden_size
  blocks = {kind: [] for kind in kinds.values()}
  for index, hf_kind in enumerate(config.layers_block_type):
    pre = f"model.layers.{index}.mixer."
    block = {"norm": {"scale": w[f"model.layers.{index}.norm.weight"]}}
    if hf_kind == "linear_attention":
      block["mixer"] = mixer_params_from_hf(w, pre, mamba, d)
    elif hf_kind == "full_attention":
      h = config.head_dim
      block["attn"] = {name: w[pre + f"{name}.weight"].T.reshape(d, -1, h)
                       for name in ("q_proj", "k_proj", "v_proj")}
      block["attn"]["o_proj"] = w[pre + "o_proj.weight"].T.reshape(-1, h, d)
    else:
      block["mlp"] = dict(up_proj=w[pre + "up_proj.weight"].T,
                          down_proj=w[pre + "down_proj.weight"].T)
    blocks[kinds[hf_kind]].append(block)
  stacked = {kind: jax.tree.map(lambda *a: np.stack(a), *layers)
             for kind, layers in blocks.items() if layers}
  params = dict(embed=w["model.embeddings.weight"], layers=stacked,
                final_norm={"scale": w["model.norm_f.weight"]}, lm_head=w["lm_head.weight"].T)
  return ours, jax.tree.map(jnp.asarray, params)


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_logits_equal_transformers(pattern):
  config, hf = _hf_model(PATTERNS[pattern])
  ours, params = _ours(config, hf)
  assert jax.tree.structure(params) == jax.tree.structure(model.abstract_params(ours))
  assert ours.num_params() == sum(p.numel() for p in hf.parameters())
  with torch.no_grad():
    expected = hf(torch.tensor(TOKENS), use_cache=False).logits.numpy()
  assert_close_relative(model.apply(ours, params, jnp.asarray(TOKENS)), expected, FP32_TOLERANCE)


def test_gradients_equal_transformers():
  config, hf = _hf_model(PATTERNS["mamba_mlp_attention"], seed=1)
  ours, params = _ours(config, hf)
  weights = np.random.default_rng(0).normal(size=TOKENS.shape + (config.vocab_size,))
  (hf(torch.tensor(TOKENS), use_cache=False).logits * torch.tensor(weights, dtype=torch.float32)).sum().backward()

  def loss(params):
    return jnp.sum(model.apply(ours, params, jnp.asarray(TOKENS)) * weights)

  grads = jax.grad(loss)(params)
  torch_grads = dict(hf.named_parameters())
  # Layer 4 is the second MLP layer (index 1 of the mlp stack), layer 3 the second Mamba one.
  assert_close_relative(grads["layers"]["mlp"]["mlp"]["up_proj"][1].T,
                        torch_grads["model.layers.4.mixer.up_proj.weight"].grad.numpy(), 3e-5)
  assert_close_relative(grads["layers"]["mamba"]["mixer"]["A_log"][1],
                        torch_grads["model.layers.3.mixer.A_log"].grad.numpy(), 3e-5)
  assert_close_relative(grads["layers"]["attention"]["attn"]["o_proj"][0].reshape(-1, 24).T,
                        torch_grads["model.layers.2.mixer.o_proj.weight"].grad.numpy(), 3e-5)
  assert_close_relative(grads["embed"], torch_grads["model.embeddings.weight"].grad.numpy(), 3e-5)


def test_packed_rows_equal_separate_documents():
  config, hf = _hf_model(PATTERNS["mamba_mlp_attention"], seed=2)
  ours, params = _ours(config, hf)
  lengths = (5, 8)
  tokens = jnp.asarray(TOKENS[:1])
  segments = jnp.asarray(np.repeat([1, 2], lengths)[None], jnp.int32)
  positions = jnp.asarray(np.concatenate([np.arange(n) for n in lengths])[None], jnp.int32)
  packed = model.apply(ours, params, tokens, segment_ids=segments, positions=positions)
  alone = [model.apply(ours, params, tokens[:, :5]), model.apply(ours, params, tokens[:, 5:])]
  assert_close_relative(packed, jnp.concatenate(alone, axis=1), FP32_TOLERANCE)


def test_schedule_reads_each_kind_in_order():
  cfg = config_lib.tiny("nemotron", norm="rms", num_layers=5, rotary=False,
                        layer_kinds=("mamba", "mlp", "mamba", "attention", "mlp"),
                        mamba=config_lib.Mamba2Config(num_heads=2, head_dim=4, state_size=4,
                                                      num_groups=1))
  branch, index = hybrid.layer_schedule(cfg)
  assert hybrid.kinds_present(cfg) == ("attention", "mamba", "mlp")
  assert branch.tolist() == [1, 2, 1, 0, 2] and index.tolist() == [0, 0, 1, 0, 1]


@pytest.mark.parametrize("fields,message", [
    (dict(layer_kinds=("mamba", "conv")), r"layer kinds \['conv'\] are not supported"),
    (dict(layer_kinds=("mlp",)), "layer_kinds has 1 entries; num_layers=2"),
    (dict(layer_kinds=("mamba", "mlp")), "mamba must be set exactly when"),
])
def test_bad_layer_kinds_are_refused_in_one_line(fields, message):
  with pytest.raises(ConfigError, match=message):
    config_lib.tiny("nemotron", norm="rms", **fields)


def test_serving_memory_counts_attention_kv_and_constant_mamba_state():
  mamba = config_lib.Mamba2Config(num_heads=4, head_dim=8, state_size=16, num_groups=2,
                                  conv_kernel=4)
  cfg = config_lib.tiny("nemotron", norm="rms", num_layers=4, rotary=False, mamba=mamba,
                        layer_kinds=("mamba", "attention", "mlp", "mamba"))
  # One attention layer: keys and values of 2 KV heads x head_dim 16 per token, in bfloat16.
  assert cfg.kv_cache_bytes(3, 100) == 3 * 100 * 2 * 2 * 16 * 2
  # Per Mamba layer and sequence: the 4x8x16 scan state and 3 taps of (32 + 2x2x16) inputs.
  per_layer = 4 * 8 * 16 + 3 * (32 + 2 * 2 * 16)
  assert cfg.recurrent_state_bytes(3) == 2 * 3 * per_layer * 2
  grown = cfg.memory_bytes(3, 1000) - cfg.memory_bytes(3, 100)
  assert grown == cfg.kv_cache_bytes(3, 1000) - cfg.kv_cache_bytes(3, 100)


def test_sharded_forward_and_gradients_match_one_device():
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (tests/conftest.py sets --xla_force_host_platform_device_count)")
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=2, fsdp=2, tensor=2))
  config, hf = _hf_model(PATTERNS["mamba_mlp_attention"], seed=3)
  ours, params = _ours(config, hf)
  tokens = jnp.asarray(np.tile(TOKENS, (2, 1)))

  def loss(params, tokens):
    return jnp.mean(jax.nn.logsumexp(model.apply(ours, params, tokens), axis=-1))

  expected = jax.value_and_grad(loss)(params, tokens)
  placed = sharding.shard_params(ours, params, mesh)
  in_x = placed["layers"]["mamba"]["mixer"]["in_x"]
  assert in_x.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  with jax.set_mesh(mesh):
    got = jax.jit(jax.value_and_grad(loss))(
        placed, jax.device_put(tokens, partitioning.batch_sharding(mesh, tokens.shape)))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    assert_close_relative(a, b, FP32_TOLERANCE)


GENERATION_PROMPTS = [[5, 9, 10, 3, 7], [11, 12, 13, 14, 15, 16, 17, 18, 19], [42, 1]]


@pytest.mark.parametrize("pattern", ["mamba_mlp_attention", "attention_first"])
def test_greedy_generation_equals_transformers_on_a_left_padded_batch(pattern):
  from minitron_jax.models import generate

  config, hf = _hf_model(PATTERNS[pattern], seed=5)
  ours, params = _ours(config, hf)
  new = 8
  width = max(map(len, GENERATION_PROMPTS))
  tokens = np.zeros((3, width), np.int64)
  mask = np.zeros((3, width), np.int64)
  for row, prompt in enumerate(GENERATION_PROMPTS):
    tokens[row, width - len(prompt):], mask[row, width - len(prompt):] = prompt, 1
  with torch.no_grad():
    expected = hf.generate(torch.tensor(tokens), attention_mask=torch.tensor(mask),
                           do_sample=False, max_new_tokens=new, min_new_tokens=new,
                           pad_token_id=0, eos_token_id=None)[:, width:].tolist()
  got = generate.generate(ours, params, GENERATION_PROMPTS, max_new_tokens=new)
  assert got == expected
  assert len(set(got[1])) > 2  # not an echo of one token


def test_cached_generation_of_a_mamba_only_model_equals_a_full_forward_argmax():
  # transformers' generate cannot run a model without attention layers (its cache asks one for
  # the mask sizes), so the reference here is our own uncached forward, checked above.
  from minitron_jax.models import generate

  config, hf = _hf_model(PATTERNS["mamba_only"], seed=6)
  ours, params = _ours(config, hf)
  got = generate.generate(ours, params, GENERATION_PROMPTS, max_new_tokens=6)
  for prompt, new in zip(GENERATION_PROMPTS, got):
    logits = model.apply(ours, params, jnp.asarray([prompt + new]))[0]
    np.testing.assert_array_equal(np.argmax(logits[len(prompt) - 1:-1], axis=-1), new)


def test_attention_without_rotary_embeddings_ignores_positions():
  # rope.rotary_tables gives empty tables for rotary=False, so any model's attention, dense
  # ones included, sees no positions: shifting them changes nothing.
  cfg = config_lib.tiny("llama", rotary=False)
  params = model.init(cfg)
  tokens = jnp.asarray(TOKENS % cfg.vocab_size)
  positions = jnp.broadcast_to(jnp.arange(TOKENS.shape[1]), TOKENS.shape)
  np.testing.assert_array_equal(model.apply(cfg, params, tokens, positions=positions),
                                model.apply(cfg, params, tokens, positions=positions + 7))
  rotated = config_lib.tiny("llama")
  assert not np.array_equal(model.apply(rotated, params, tokens, positions=positions),
                            model.apply(rotated, params, tokens, positions=positions + 7))
