"""Every attention path CPU can run equals the naive reference: values and gradients on rows that
carry loss, with packed segments, padding, windows (static and traced), GQA and ragged blocks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minitron_jax.models import attention
from minitron_jax.models import config as config_lib
from minitron_jax.checkpoints import hf
from minitron_jax.models import model
from minitron_jax.run import run_config, validate
from minitron_jax.models.attention import NO_WINDOW
from minitron_jax.errors import ConfigError

B, T, K, G, H = 2, 37, 2, 3, 8  # T is a multiple of no block size used here
SCALE = H ** -0.5


def _inputs(dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (B, T, K, G, H), dtype)
  k = jax.random.normal(keys[1], (B, T, K, H), dtype)
  v = jax.random.normal(keys[2], (B, T, K, H), dtype)
  # Row 0: two packed documents then padding; row 1: one document then padding.
  segments = np.ones((B, T), np.int32)
  segments[0, 15:], segments[0, 30:], segments[1, 33:] = 2, 0, 0
  cotangent = jax.random.normal(keys[3], (B, T, K, G, H), jnp.float32)
  return q, k, v, jnp.asarray(segments), cotangent


def _loss_and_grads(attend, q, k, v, segments, cotangent):
  """A loss on the rows that carry one (padding rows never do), and its gradients."""
  valid = (segments != 0)[:, :, None, None, None]

  def loss(q, k, v):
    out = attend(q, k, v)
    return jnp.sum(jnp.where(valid, out.astype(jnp.float32) * cotangent, 0.0)), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)
  return jnp.where(valid, out.astype(jnp.float32), 0.0), grads


def _assert_close(actual, expected, tolerance):
  """Relative to the largest entry, floored at 1: inputs are O(1), and some expected gradients
  are exact zeros (a window of 1 makes each output its own value, so dq = 0)."""
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    error = np.max(np.abs(a - e))
    assert error <= tolerance * max(np.max(np.abs(e)), 1.0), error


def _path(implementation, window, block_size, segments):
  return lambda q, k, v: attention.attend(q, k, v, segment_ids=segments, window=window,
                                          scale=SCALE, implementation=implementation,
                                          block_size=block_size)


@pytest.mark.parametrize("window", [NO_WINDOW, 5, 1])
@pytest.mark.parametrize("block_size", [8, 16, 512])
def test_blockwise_equals_naive(window, block_size):
  q, k, v, segments, cotangent = _inputs()
  expected = _loss_and_grads(_path("naive", window, block_size, segments), q, k, v, segments,
                             cotangent)
  actual = _loss_and_grads(_path("blockwise", window, block_size, segments), q, k, v, segments,
                           cotangent)
  _assert_close(actual, expected, 1e-5)


@pytest.mark.parametrize("window", [NO_WINDOW, 5])
def test_splash_in_interpret_mode_equals_naive(window):
  q, k, v, segments, cotangent = _inputs()
  expected = _loss_and_grads(_path("naive", window, 128, segments), q, k, v, segments, cotangent)
  actual = _loss_and_grads(_path("splash", window, 128, segments), q, k, v, segments, cotangent)
  _assert_close(actual, expected, 1e-5)


@pytest.mark.parametrize("window,block_size", [(NO_WINDOW, 8), (5, 16), (NO_WINDOW, 512)])
def test_soft_capped_blockwise_equals_naive(window, block_size):
  """Gemma 2's cap * tanh(score / cap): naive differentiates through the tanh by autodiff, so
  equal gradients check the chain rule blockwise's custom VJP applies by hand."""
  q, k, v, segments, cotangent = _inputs()
  q = 3 * q  # scores of a few units, so a cap of 2 bends most of them
  expected = _loss_and_grads(lambda *a: attention.attend(
      *a, segment_ids=segments, window=window, scale=SCALE, implementation="naive",
      softcap=2.0), q, k, v, segments, cotangent)
  actual = _loss_and_grads(lambda *a: attention.attend(
      *a, segment_ids=segments, window=window, scale=SCALE, implementation="blockwise",
      block_size=block_size, softcap=2.0), q, k, v, segments, cotangent)
  _assert_close(actual, expected, 1e-5)
  uncapped = _loss_and_grads(_path("naive", window, block_size, segments), q, k, v, segments,
                             cotangent)
  assert np.max(np.abs(np.asarray(uncapped[1][0]) - np.asarray(expected[1][0]))) > 1e-2


def test_soft_capped_splash_in_interpret_mode_equals_naive():
  q, k, v, segments, cotangent = _inputs()
  run = lambda name: lambda *a: attention.attend(
      *a, segment_ids=segments, window=5, scale=SCALE, implementation=name, block_size=128,
      softcap=2.0)
  _assert_close(_loss_and_grads(run("splash"), 3 * q, k, v, segments, cotangent),
                _loss_and_grads(run("naive"), 3 * q, k, v, segments, cotangent), 1e-5)


@pytest.mark.parametrize("implementation", ["blockwise", "splash"])
def test_bfloat16_inputs_stay_close_to_float32(implementation):
  q, k, v, segments, cotangent = _inputs()
  expected = _loss_and_grads(_path("naive", 5, 16, segments), q, k, v, segments, cotangent)
  low = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  actual = _loss_and_grads(_path(implementation, 5, 16, segments), *low, segments, cotangent)
  assert actual[0].dtype == jnp.float32 and actual[1][0].dtype == jnp.bfloat16
  _assert_close(actual, expected, 3e-2)


def test_traced_window_through_a_scan():
  """Per-layer windows arrive as traced int32 scalars from the model's layer scan."""
  q, k, v, segments, cotangent = _inputs()
  windows = jnp.asarray([NO_WINDOW, 5, 1, 12], jnp.int32)

  def stacked(implementation):
    def run(q, k, v):
      def layer(_, window):
        return None, _path(implementation, window, 8, segments)(q, k, v)
      return jnp.sum(jax.lax.scan(layer, None, windows)[1], axis=0)
    return run

  _assert_close(_loss_and_grads(stacked("blockwise"), q, k, v, segments, cotangent),
                _loss_and_grads(stacked("naive"), q, k, v, segments, cotangent), 1e-5)


def test_rows_that_see_nothing_are_zero_with_finite_gradients():
  q, k, v, _, cotangent = _inputs()
  segments = jnp.zeros((B, T), jnp.int32).at[1, :4].set(1)  # row 0 is all padding
  grads = jax.grad(lambda q, k, v: jnp.sum(_path("blockwise", NO_WINDOW, 8, segments)(q, k, v)
                                           * cotangent), (0, 1, 2))(q, k, v)
  out = _path("blockwise", NO_WINDOW, 8, segments)(q, k, v)
  assert np.all(np.asarray(out[0]) == 0) and np.all(np.asarray(out[1, 4:]) == 0)
  assert all(np.all(np.isfinite(g)) for g in grads)
  assert np.all(np.asarray(grads[1][0]) == 0)  # nothing reads row 0's keys


@pytest.mark.parametrize("window", [NO_WINDOW, 5])
def test_cudnn_mask_mapping_with_the_xla_kernel(window):
  """cudnn needs a GPU; the same call with jax's XLA kernel checks how our mask maps onto its
  lengths and window, and that packed rows go to the fallback."""
  q, k, v, _, cotangent = _inputs()
  segments = jnp.asarray(np.where(np.arange(T) < np.asarray([[30], [33]]), [[1], [3]], 0),
                         jnp.int32)  # one document per row, then padding
  sentinel = lambda q, *_: jnp.full(q.shape, 7.0, q.dtype)
  mapped = functools.partial(attention._cudnn, segment_ids=segments, window=window, scale=SCALE,
                             blockwise=sentinel, kernel="xla")
  _assert_close(_loss_and_grads(mapped, q, k, v, segments, cotangent),
                _loss_and_grads(_path("naive", window, 8, segments), q, k, v, segments,
                                cotangent), 1e-5)
  packed = segments.at[0, 10:30].set(2)
  out = attention._cudnn(q, k, v, packed, window, SCALE, sentinel, kernel="xla")
  assert np.all(np.asarray(out[0, :30]) == 7.0)


def test_unsupported_implementations_are_one_line_errors():
  q, k, v, segments, _ = _inputs()
  with pytest.raises(ConfigError, match="attention='cudnn' needs a CUDA GPU"):
    _path("cudnn", NO_WINDOW, 8, segments)(q, k, v)
  with pytest.raises(ConfigError, match="attention='flash' is not supported; allowed"):
    _path("flash", NO_WINDOW, 8, segments)(q, k, v)
  with pytest.raises(ConfigError, match="attention='flash' is not supported; allowed"):
    config_lib.tiny("llama", attention="flash")
  with pytest.raises(ConfigError, match="attention_block_size=0 must be a positive integer"):
    config_lib.tiny("llama", attention_block_size=0)


def test_attention_settings_are_compute_options():
  """Saved model configs from before the setting load with the default; HF exports omit it."""
  config = config_lib.tiny("qwen2", attention="naive", attention_block_size=64)
  fields = config.to_dict()
  assert config_lib.ModelConfig.from_dict(fields) == config
  del fields["attention"], fields["attention_block_size"]
  assert config_lib.ModelConfig.from_dict(fields) == config.replace(attention="auto",
                                                                      attention_block_size=512)
  assert not any("attention" in key and "heads" not in key and "bias" not in key
                 for key in hf.config_to_hf(config))


@pytest.mark.parametrize("family,overrides,with_grads", [
    ("llama", {}, False),
    ("mistral", {}, False),  # one window for every layer: a Python int
    ("qwen2", dict(sliding_window=3, sliding_window_layers=(True, False)), True),  # traced
    ("gemma2", {}, True),  # soft-capped scores and windows on alternate layers
    ("gemma3", {}, False),  # local and global RoPE bases
])
def test_model_blockwise_equals_naive(family, overrides, with_grads):
  config = config_lib.tiny(family, **overrides)
  params = model.init(config, 0)
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 256, (2, 21)))
  segments = jnp.asarray([[1] * 9 + [2] * 8 + [0] * 4, [1] * 21])
  positions = jnp.asarray([list(range(9)) + list(range(8)) + [0] * 4, list(range(21))])
  valid = np.asarray(segments != 0)

  def loss(params, implementation):
    cfg = config.replace(attention=implementation, attention_block_size=8)
    logits = model.apply(cfg, params, tokens, segment_ids=segments, positions=positions)
    return jnp.sum(jnp.where(valid[..., None], jax.nn.log_softmax(logits), 0.0)), logits

  def outputs(implementation):
    if not with_grads:
      return np.asarray(loss(params, implementation)[1])[valid]
    (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(params, implementation)
    return np.asarray(logits)[valid], grads

  _assert_close(outputs("blockwise"), outputs("naive"), 1e-5)


def test_blockwise_training_memory_grows_as_t_times_block():
  """XLA's own estimate of the gradient's temporaries, compiled from shapes alone: a 2-layer,
  8-head model at T=8192 must fit in an eighth of one layer's naive float32 score tensor."""
  seq, heads = 8192, 8
  config = config_lib.tiny("llama", hidden_size=64, num_attention_heads=heads,
                           num_key_value_heads=2, head_dim=16, intermediate_size=128,
                           max_position_embeddings=seq)

  def temporaries(implementation):
    cfg = config.replace(attention=implementation)

    def loss(params, tokens):
      return jnp.mean(jax.nn.logsumexp(model.apply(cfg, params, tokens), axis=-1))

    compiled = jax.jit(jax.grad(loss)).lower(model.abstract_params(cfg),
                                             jax.ShapeDtypeStruct((1, seq), jnp.int32)).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  one_layer_scores = 1 * heads * seq * seq * 4  # 2 GiB
  assert temporaries("naive") > one_layer_scores  # the estimate does see T x T buffers
  assert temporaries("blockwise") <= one_layer_scores / 8


def test_run_validation_names_a_kernel_this_backend_lacks():
  config = run_config.base_config()
  config.model.update(attention="cudnn", attention_block_size=0)
  problems = validate.validate(config, "/nonexistent/workdir")
  assert "model: attention_block_size=0 must be a positive integer" in problems
  assert ("model.attention: 'cudnn' needs a GPU; this backend is cpu (allowed here: 'auto', "
          "'naive', 'blockwise')") in problems
  config.model.update(attention="naive", attention_block_size=64)
  assert not [p for p in validate.validate(config, "/nonexistent/workdir") if "attention" in p]
