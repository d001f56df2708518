"""Gemma 1/2/3 text models: transformers parity, export, pruning on every axis, presets, a smoke run.

Reference models are tiny random transformers models built in process (hidden 48, 4 heads of
head_dim 16, 2 query groups, 3 layers), with soft caps small enough to bend random logits and
sliding windows shorter than the 12-token inputs, so every Gemma option changes the numbers.
"""

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_reference import (assert_close_relative, hf_config, hf_logits, hf_model, torch,
                          transformers)
from minitron_jax.models import config as config_lib
from minitron_jax.checkpoints import hf
from minitron_jax.compress import importance, prune
from minitron_jax.models import model
from minitron_jax.run import pipeline
from minitron_jax.errors import ConfigError

TOKENS = np.random.RandomState(0).randint(0, 120, size=(2, 12))
FP32_TOLERANCE = 1e-5
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]
OPTIONS = {
    "gemma": {},
    "gemma2": dict(attn_logit_softcapping=2.0, final_logit_softcapping=3.0, sliding_window=4,
                   query_pre_attn_scalar=24, layer_types=LAYER_TYPES),
    "gemma3": dict(final_logit_softcapping=3.0, sliding_window=4, query_pre_attn_scalar=24,
                   layer_types=LAYER_TYPES, rope_parameters={
                       "full_attention": {"rope_type": "linear", "factor": 8.0,
                                          "rope_theta": 1e6},
                       "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
}


def _load(directory, family, **overrides):
  reference = hf_model(hf_config(family, **{**OPTIONS[family], **overrides}))
  reference.save_pretrained(directory)
  config, params = hf.load(directory)
  return reference, config, params


def _logits(config, params, tokens=TOKENS):
  return np.asarray(model.apply(config, params, jnp.asarray(tokens)))


def _reloaded_logits(directory):
  return hf_logits(transformers.AutoModelForCausalLM.from_pretrained(directory).eval(), TOKENS)


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3"])
@pytest.mark.parametrize("kv_heads", [2, 1], ids=["gqa2", "mqa"])
def test_load_matches_transformers_and_export_reloads(tmp_path, family, kv_heads):
  reference, config, params = _load(tmp_path / "hf", family, num_key_value_heads=kv_heads)
  assert config.family == family and config.norm == "rms1p"
  assert config.embedding_scale == 48 ** 0.5 and config.tie_word_embeddings
  logits = _logits(config, params)
  assert_close_relative(logits, hf_logits(reference, TOKENS), FP32_TOLERANCE)
  hf.save(tmp_path / "export", config, params)
  assert_close_relative(_reloaded_logits(tmp_path / "export"), logits, FP32_TOLERANCE)
  again_config, again_params = hf.load(tmp_path / "export")
  assert again_config == config
  np.testing.assert_array_equal(_logits(again_config, again_params), logits)


def test_every_gemma_option_changes_the_logits(tmp_path):
  """Parity above means something only if each option bites on these inputs."""
  _, config, params = _load(tmp_path / "g2", "gemma2")
  assert config.sliding_window_layers == (True, False, True)
  logits = _logits(config, params)
  for change in (dict(attn_logit_softcap=None), dict(final_logit_softcap=None),
                 dict(sliding_window=None, sliding_window_layers=None),
                 dict(query_pre_attn_scalar=None), dict(embedding_scale=None)):
    other = _logits(config.replace(**change), params)
    assert np.max(np.abs(other - logits)) > 1e-3 * np.max(np.abs(logits)), change
  _, config, params = _load(tmp_path / "g3", "gemma3")
  assert (config.local_rope_theta, config.rope_theta) == (1e4, 1e6)
  assert config.rope_scaling.kind == "linear" and config.qk_norm and config.post_norms
  logits = _logits(config, params)
  for change in (dict(local_rope_theta=None), dict(rope_scaling=None)):
    other = _logits(config.replace(**change), params)
    assert np.max(np.abs(other - logits)) > 1e-3 * np.max(np.abs(logits)), change


def test_intermediates_include_the_post_norms(tmp_path):
  reference, config, params = _load(tmp_path / "hf", "gemma2")
  with torch.no_grad():
    hidden = [h.numpy() for h in reference(torch.tensor(TOKENS),
                                           output_hidden_states=True).hidden_states]
  _, inter = model.apply(config, params, jnp.asarray(TOKENS), return_intermediates=True)
  for layer in range(config.num_layers):
    assert_close_relative(inter["layer_input"][layer], hidden[layer], FP32_TOLERANCE)
  assert inter["attn_post_norm"].shape == inter["mlp_post_norm"].shape == (3, 2, 12, 48)
  # The residual stream adds exactly the post-normed block outputs.
  np.testing.assert_allclose(
      inter["layer_output"],
      inter["layer_input"] + inter["attn_post_norm"] + inter["mlp_post_norm"], atol=1e-5)


def test_bfloat16_compute_stays_close(tmp_path):
  reference, config, params = _load(tmp_path / "hf", "gemma2")
  ours = _logits(config.replace(dtype="bfloat16"), params)
  assert_close_relative(ours, hf_logits(reference, TOKENS), 5e-2)
  assert_close_relative(ours, hf_logits(reference.to(torch.bfloat16), TOKENS), 5e-2)


def test_gemma3_vision_checkpoint_loads_its_text_model(tmp_path):
  # Gemma3ForConditionalGeneration applies no final soft cap (hf.py refuses one).
  text = hf_config("gemma3", **{**OPTIONS["gemma3"], "final_logit_softcapping": None}).to_dict()
  vision = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=32,
                                           num_hidden_layers=1, num_attention_heads=2,
                                           image_size=28, patch_size=14)
  reference = hf_model(transformers.Gemma3Config(
      text_config=text, vision_config=vision.to_dict(), mm_tokens_per_image=1,
      image_token_index=127, boi_token_index=125, eoi_token_index=126))
  assert type(reference).__name__ == "Gemma3ForConditionalGeneration"
  reference.save_pretrained(tmp_path / "hf")
  with pytest.warns(UserWarning, match="gemma3 checkpoint holds a vision tower; only the text "
                    r"model is supported: \d+ vision tensors were left out"):
    config, params = hf.load(tmp_path / "hf")
  assert config.family == "gemma3" and config.local_rope_theta == 1e4
  logits = _logits(config, params)
  assert_close_relative(logits, hf_logits(reference, TOKENS), FP32_TOLERANCE)
  hf.save(tmp_path / "export", config, params)
  assert json.loads((tmp_path / "export" / "config.json").read_text())["model_type"] == \
      "gemma3_text"
  assert_close_relative(_reloaded_logits(tmp_path / "export"), logits, FP32_TOLERANCE)


def test_hub_gemma3_config_fills_transformers_defaults():
  """Hub gemma3 configs list only what differs from Gemma3TextConfig's defaults (here 4B's)."""
  text = dict(hidden_size=2560, intermediate_size=10240, model_type="gemma3_text",
              num_attention_heads=8, num_hidden_layers=34, num_key_value_heads=4,
              rope_scaling={"factor": 8.0, "rope_type": "linear"}, sliding_window=1024)
  ours = hf.config_from_hf({"model_type": "gemma3", "text_config": text, "vision_config": {}})
  theirs = transformers.Gemma3Config(text_config=dict(text)).text_config.to_dict()
  assert hf.config_from_hf(theirs).replace(hf_extras=()) == ours.replace(hf_extras=())
  assert (ours.vocab_size, ours.head_dim, ours.local_rope_theta, ours.rope_theta) == (
      262208, 256, 1e4, 1e6)
  assert ours.rope_scaling.factor == 8.0
  assert ours.sliding_window_layers == tuple((i + 1) % 6 != 0 for i in range(34))


@pytest.mark.parametrize("change, message", [
    (dict(model_type="gemma2", use_bidirectional_attention=True),
     "use_bidirectional_attention=True is not supported for gemma2"),
    (dict(model_type="gemma3_text", attn_logit_softcapping=50.0),
     "attn_logit_softcapping=50.0 is not supported for gemma3"),
    (dict(model_type="gemma3_text", rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}),
     "sliding_attention rope_type='linear' is not supported"),
    (dict(model_type="gemma2", hidden_activation="tanh"), "hidden_activation='tanh'"),
    (dict(model_type="gemma3"), "model_type='gemma3' config has no text_config"),
    (dict(model_type="gemma3", text_config=dict(final_logit_softcapping=30.0)),
     "final_logit_softcapping=30.0 is not supported for a gemma3 \\(vision \\+ text\\)"),
])
def test_unsupported_gemma_fields_are_refused(change, message):
  fields = dict(vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, head_dim=16, **change)
  with pytest.raises(ConfigError, match=message):
    hf.config_from_hf(fields)


# ----------------------------------------------------------------------------- pruning


@pytest.fixture(scope="module", params=["gemma2", "gemma3"])
def loaded(request, tmp_path_factory):
  directory = tmp_path_factory.mktemp(request.param)
  _, config, params = _load(directory, request.param)
  batches = [np.random.RandomState(i).randint(0, 128, (4, 16)) for i in range(2)]
  scores = importance.estimate(config, params, batches, block_sizes=(1,))
  return config, params, scores


AXES = {
    "heads": dict(num_attention_heads=2),
    "query_groups": dict(num_key_value_heads=1, num_attention_heads=2),
    "neurons": dict(intermediate_size=64),
    "hidden": dict(hidden_size=40),
    "layers": dict(num_layers=2),
    "all": dict(num_layers=2, hidden_size=40, num_attention_heads=2, num_key_value_heads=1,
                intermediate_size=64),
}


@pytest.mark.parametrize("axis", AXES)
def test_pruned_export_matches_in_transformers(tmp_path, loaded, axis):
  config, params, scores = loaded
  pruned_config, pruned = prune.prune(config, params, scores, AXES[axis])
  for key, value in AXES[axis].items():
    assert getattr(pruned_config, key) == value
  assert pruned_config.embedding_scale == 48 ** 0.5  # see test_embedding_scale_after_...
  assert sum(p.size for p in jax.tree.leaves(pruned)) == pruned_config.num_params()
  logits = _logits(pruned_config, pruned)
  hf.save(tmp_path, pruned_config, pruned)
  assert_close_relative(_reloaded_logits(tmp_path), logits, FP32_TOLERANCE)
  # Reloaded, the export states transformers' scale with the ratio folded into the weights.
  again_config, again_params = hf.load(tmp_path)
  assert again_config.embedding_scale == pruned_config.hidden_size ** 0.5
  assert_close_relative(_logits(again_config, again_params), logits, FP32_TOLERANCE)


def test_embedding_importance_reads_every_norm_including_post_norms(loaded):
  config, _, scores = loaded
  assert scores.stats["embedding"].shape[0] == 4 * config.num_layers + 1


def test_depth_pruning_keeps_each_layers_kind(tmp_path, loaded):
  config, params, scores = loaded
  layers = prune.select(config, scores, {"num_layers": 2}).layers
  pruned_config, pruned = prune.prune(config, params, scores, {"num_layers": 2})
  kinds = [LAYER_TYPES[i] for i in layers]
  assert pruned_config.sliding_window_layers == tuple(k == "sliding_attention" for k in kinds)
  if config.local_rope_theta is not None:
    assert pruned_config.local_rope_layers() == pruned_config.sliding_window_layers
  hf.save(tmp_path, pruned_config, pruned)
  assert json.loads((tmp_path / "config.json").read_text())["layer_types"] == kinds
  # The kept layers compute what they computed in the full model: dropping a layer equals
  # zeroing the outputs it writes (its post-norm gains, so the residual add is zero).
  dropped = int(np.setdiff1d(np.arange(3), layers)[0])
  zeroed = jax.tree.map(np.array, params)
  for site in ("attn_post_norm", "mlp_post_norm"):
    zeroed["layers"][site]["scale"][dropped] = -1.0  # rms1p: a gain of 1 + w = 0
  assert_close_relative(_logits(pruned_config, pruned), _logits(config, zeroed), FP32_TOLERANCE)


def _norm_gains_times(config, params, ratio):
  """Every hidden-size norm's gain multiplied by ratio (rms: w; rms1p: 1 + w)."""
  params = jax.tree.map(np.array, params)
  sites = [params["final_norm"]] + [params["layers"][name] for name in
                                    ("attn_norm", "mlp_norm", "attn_post_norm", "mlp_post_norm")
                                    if name in params["layers"]]
  for site in sites:
    gain = site["scale"] + (1.0 if config.norm == "rms1p" else 0.0)
    site["scale"] = gain * ratio - (1.0 if config.norm == "rms1p" else 0.0)
  return params


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3"])
def test_embedding_scale_after_hidden_pruning(family):
  """With embedding_scale kept at sqrt(D), hidden pruning D -> D' equals zeroing the pruned
  channels (embedding columns and every block's output rows) with every norm's gain times
  sqrt(D'/D); transformers' sqrt(D') would not. Exact up to the norms' eps, which does not scale
  with the gains: a negligible one makes that visible at 1e-5 on Llama's small residual stream."""
  config = config_lib.tiny(family, num_layers=3, sliding_window=None, sliding_window_layers=None,
                           norm_eps=1e-12)
  params = model.init(config, 0)
  keys = jax.random.split(jax.random.key(1), len(jax.tree.leaves(params)))
  params = jax.tree.unflatten(jax.tree.structure(params), [
      np.asarray(p + 0.1 * jax.random.normal(k, p.shape))
      for p, k in zip(jax.tree.leaves(params), keys)])
  scores = importance.estimate(config, params, [np.arange(64).reshape(4, 16)], block_sizes=(1,))
  pruned_config, pruned = prune.prune(config, params, scores, {"hidden_size": 40})
  kept = prune.select(config, scores, {"hidden_size": 40}).embed
  dropped = np.setdiff1d(np.arange(64), kept)
  zeroed = _norm_gains_times(config, params, np.sqrt(40 / 64))
  zeroed["embed"][:, dropped] = 0
  zeroed["layers"]["attn"]["o_proj"][..., dropped] = 0
  zeroed["layers"]["mlp"]["down_proj"][..., dropped] = 0
  if "lm_head" in zeroed:
    zeroed["lm_head"][dropped] = 0
  expected = _logits(config, zeroed, TOKENS)
  assert_close_relative(_logits(pruned_config, pruned, TOKENS), expected, 1e-5)
  if config.embedding_scale is not None:
    transformers_scale = pruned_config.replace(embedding_scale=40 ** 0.5)
    error = np.max(np.abs(_logits(transformers_scale, pruned, TOKENS) - expected))
    assert error > 1e-3 * np.max(np.abs(expected))


# ----------------------------------------------------------------------------- presets and runs


def _transformers_param_count(config) -> int:
  """Parameters of the transformers model our exported config describes, on the meta device."""
  hf_fields = {k: v for k, v in hf.config_to_hf(config).items() if k != "architectures"}
  hf_config_ = transformers.AutoConfig.for_model(**hf_fields)
  with torch.device("meta"):
    reference = transformers.AutoModelForCausalLM.from_config(hf_config_)
  return sum(p.numel() for p in reference.parameters())  # tied weights counted once


@pytest.mark.parametrize("preset, published", [("gemma2_2b", 2_614_341_888),
                                               ("gemma3_1b", 999_885_952)])
def test_presets_match_the_model_cards(preset, published):
  config = config_lib.PRESETS[preset]()
  assert config.num_params() == published
  assert _transformers_param_count(config) == published
  abstract = model.abstract_params(config)
  assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(abstract)) == published


def test_runlocal_smoke_runs_every_stage(tmp_path):
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "configs"))
  import default  # noqa: E402  (configs/ is not a package)

  config = default.get_config("family=gemma2,runlocal")
  # The harness and completions are the default family's to check (test_evaluate_stage.py).
  config.evaluate.lm_eval.own_tasks = ""
  config.evaluate.prompts = ()
  pipeline.run(config, tmp_path, log=lambda _: None)
  metrics = json.loads((tmp_path / "evaluate" / "metrics.json").read_text())
  assert "teacher" in metrics and any("distilled" in label for label in metrics)
  assert "![distillation curves](curves/distill.png)" in (tmp_path / "report.md").read_text()
  assert (tmp_path / "curves" / "distill.png").read_bytes()[:4] == b"\x89PNG"
  exported, _ = hf.load(next(p.parent for p in tmp_path.rglob("config.json")
                            if "distill" in str(p)))
  assert exported.family == "gemma2"
