"""Import/export parity with Hugging Face `transformers` for every supported family."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from hf_reference import (FAMILIES, assert_close_relative, assert_export_round_trip, hf_config,
                          hf_logits, load_saved_reference, transformers)
from minitron_jax.checkpoints import hf
from minitron_jax.models import model
from minitron_jax.errors import ConfigError

TOKENS = np.random.RandomState(0).randint(0, 128, size=(2, 12))
FP32_TOLERANCE = 1e-5


def _round_trip(tmp_path, config):
  return load_saved_reference(tmp_path / "hf", config, TOKENS)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["gqa1", "gqa2", "gqa4"])
def test_load_matches_transformers_and_export_reloads(tmp_path, family, kv_heads):
  reference, config, params, logits = _round_trip(
      tmp_path, hf_config(family, num_key_value_heads=kv_heads))
  assert config.queries_per_group == 4 // kv_heads
  assert config.head_dim * config.num_attention_heads != config.hidden_size
  assert_close_relative(logits, hf_logits(reference, TOKENS), FP32_TOLERANCE)

  assert_export_round_trip(tmp_path / "export", config, params, TOKENS, logits, FP32_TOLERANCE)


@pytest.mark.parametrize("family", ["llama", "nemotron"])
def test_head_dim_derived_from_hidden(tmp_path, family):
  reference, config, _, logits = _round_trip(tmp_path, hf_config(family, head_dim=None))
  assert config.head_dim == 12
  assert_close_relative(logits, hf_logits(reference, TOKENS), FP32_TOLERANCE)


@pytest.mark.parametrize("scaling", [
    dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
         original_max_position_embeddings=32),
    dict(rope_type="linear", factor=4.0),
], ids=["llama3", "linear"])
def test_llama_rope_scaling(tmp_path, scaling):
  config = hf_config("llama", rope_parameters={"rope_theta": 500000.0, **scaling},
                     tie_word_embeddings=True)
  reference, ours, params, logits = _round_trip(tmp_path, config)
  assert ours.rope_scaling is not None and ours.rope_scaling.kind == scaling["rope_type"]
  assert ours.tie_word_embeddings and "lm_head" not in params
  assert_close_relative(logits, hf_logits(reference, TOKENS), FP32_TOLERANCE)
  unscaled = np.asarray(model.apply(ours.replace(rope_scaling=None), params, jnp.asarray(TOKENS)))
  assert np.max(np.abs(unscaled - logits)) > 1e-3 * np.max(np.abs(logits)), "scaling had no effect"
  hf.save(tmp_path / "export", ours, params)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
  assert_close_relative(hf_logits(reloaded, TOKENS), logits, FP32_TOLERANCE)


def test_llama_with_biases(tmp_path):
  reference, config, params, logits = _round_trip(
      tmp_path, hf_config("llama", attention_bias=True, mlp_bias=True))
  assert config.qkv_bias and config.o_bias and config.mlp_bias
  assert_close_relative(logits, hf_logits(reference, TOKENS), FP32_TOLERANCE)


def test_nemotron_with_biases_and_full_rotary(tmp_path):
  config = hf_config("nemotron", attention_bias=True, mlp_bias=True,
                     rope_parameters={"rope_theta": 10000.0, "rope_type": "default",
                                      "partial_rotary_factor": 1.0})
  reference, ours, params, logits = _round_trip(tmp_path, config)
  assert ours.partial_rotary_factor == 1.0
  assert_close_relative(logits, hf_logits(reference, TOKENS), FP32_TOLERANCE)


def test_mistral_sliding_window_shorter_than_sequence(tmp_path):
  reference, config, params, logits = _round_trip(tmp_path, hf_config("mistral", sliding_window=4))
  assert config.sliding_window == 4
  assert_close_relative(logits, hf_logits(reference, TOKENS), FP32_TOLERANCE)
  unlimited = np.asarray(model.apply(config.replace(sliding_window=None), params,
                                     jnp.asarray(TOKENS)))
  assert np.max(np.abs(unlimited - logits)) > 1e-3 * np.max(np.abs(logits))


def test_qwen2_sliding_window_on_some_layers(tmp_path):
  reference, config, params, logits = _round_trip(tmp_path, hf_config(
      "qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1))
  assert config.layer_windows() == (None, 4, 4)
  assert_close_relative(logits, hf_logits(reference, TOKENS), FP32_TOLERANCE)
  hf.save(tmp_path / "export", config, params)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
  assert_close_relative(hf_logits(reloaded, TOKENS), logits, FP32_TOLERANCE)


def test_right_padding_matches_attention_mask(tmp_path):
  reference, config, params, _ = _round_trip(tmp_path, hf_config("llama"))
  mask = np.ones_like(TOKENS)
  mask[1, 7:] = 0
  logits = np.asarray(model.apply(config, params, jnp.asarray(TOKENS),
                                  segment_ids=jnp.asarray(mask)))
  expected = hf_logits(reference, TOKENS, attention_mask=mask)
  valid = mask.astype(bool)
  assert_close_relative(logits[valid], expected[valid], FP32_TOLERANCE)
  assert np.all(np.isfinite(logits))


def test_intermediates_match_transformers_hidden_states(tmp_path):
  reference, config, params, _ = _round_trip(tmp_path, hf_config("qwen3"))
  import torch
  with torch.no_grad():
    hf_out = reference(torch.tensor(TOKENS), output_hidden_states=True)
  logits, inter = model.apply(config, params, jnp.asarray(TOKENS), return_intermediates=True)
  hidden = [h.numpy() for h in hf_out.hidden_states]
  for layer in range(config.num_layers):
    assert_close_relative(inter["layer_input"][layer], hidden[layer], FP32_TOLERANCE)
  # transformers reports the last entry after the final norm.
  assert_close_relative(inter["final_norm"], hidden[-1], FP32_TOLERANCE)
  np.testing.assert_array_equal(inter["layer_output"][:-1], inter["layer_input"][1:])
  assert inter["attn_heads"].shape == (config.num_layers, 2, 12, 4, 16)
  assert inter["mlp_act"].shape == (config.num_layers, 2, 12, config.intermediate_size)


def test_bfloat16_checkpoint_and_sharded_export(tmp_path):
  reference, config, params, logits = _round_trip(tmp_path, hf_config("llama"))
  hf.save(tmp_path / "bf16", config, params, dtype="bfloat16", max_shard_bytes=20_000)
  index = json.loads((tmp_path / "bf16" / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16").eval()
  bf16_config, bf16_params = hf.load(tmp_path / "bf16")
  ours = np.asarray(model.apply(bf16_config, bf16_params, jnp.asarray(TOKENS)))
  assert_close_relative(ours, hf_logits(reloaded.float(), TOKENS), FP32_TOLERANCE)
  assert_close_relative(ours, logits, 3e-2)  # bf16 weights vs fp32 weights


def test_save_replaces_existing_directory(tmp_path):
  _, config, params, _ = _round_trip(tmp_path, hf_config("qwen2"))
  hf.save(tmp_path / "out", config, params, max_shard_bytes=20_000)
  hf.save(tmp_path / "out", config, params)
  assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json",
                                                                  "model.safetensors"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "out"]


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gpt2"}, "model_type='gpt2' is not supported"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
     "rope_type='yarn' is not supported"),
    ({"hidden_act": "tanh"}, "hidden_act='tanh' is not supported"),
    ({"num_key_value_heads": 3}, "multiple of num_key_value_heads=3"),
])
def test_unsupported_config_fields_are_refused(change, message):
  fields = hf_config("llama").to_dict()
  fields.update(change)
  with pytest.raises(ConfigError, match=message):
    hf.config_from_hf(fields)


def test_unexpected_and_missing_tensors_are_refused(tmp_path):
  _, config, params, _ = _round_trip(tmp_path, hf_config("llama"))
  tensors = hf.params_to_hf(config, params)
  with pytest.raises(ConfigError, match="does not describe"):
    hf.params_from_hf(config, {**tensors, "model.layers.0.self_attn.rogue.weight": np.zeros(3)})
  del tensors["model.layers.2.mlp.up_proj.weight"]
  with pytest.raises(ConfigError, match="lacks tensor 'model.layers.2.mlp.up_proj.weight'"):
    hf.params_from_hf(config, tensors)


def test_export_refuses_what_the_family_cannot_express(tmp_path):
  _, config, params, _ = _round_trip(tmp_path, hf_config("mistral"))
  with pytest.raises(ConfigError, match="cannot be expressed as a Hugging Face mistral config"):
    hf.save(tmp_path / "bad", config.replace(qk_norm=True), params)


def test_export_of_sharded_params_streams_and_equals_the_host_export(tmp_path):
  """Params split over 8 devices are gathered weight by weight into the same shards."""
  import jax
  import safetensors.numpy

  from minitron_jax.models import config as config_lib
  from minitron_jax.models import partitioning, sharding

  config = config_lib.tiny("llama")
  params = model.init(config, 0)
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=1, fsdp=4, tensor=2))
  hf.save(tmp_path / "host", config, jax.tree.map(np.asarray, params), max_shard_bytes=20_000)
  hf.save(tmp_path / "mesh", config, sharding.shard_params(config, params, mesh),
          max_shard_bytes=20_000)
  files = sorted(p.name for p in (tmp_path / "host").iterdir())
  assert files == sorted(p.name for p in (tmp_path / "mesh").iterdir())
  assert sum(name.endswith(".safetensors") for name in files) > 1
  for name in files:
    if name.endswith(".safetensors"):
      want = safetensors.numpy.load_file(tmp_path / "host" / name)
      got = safetensors.numpy.load_file(tmp_path / "mesh" / name)
      assert got.keys() == want.keys()
      for key in want:
        np.testing.assert_array_equal(got[key], want[key])
    else:
      assert (tmp_path / "mesh" / name).read_text() == (tmp_path / "host" / name).read_text()
