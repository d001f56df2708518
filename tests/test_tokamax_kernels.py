"""tokamax's kernels through our wrappers equal our references on CPU: packed GQA attention
(values and gradients through tokamax's XLA implementation, soft-cap included; the Triton flash
kernel's forward in Pallas interpret mode) and grouped expert matmuls. The Mosaic GPU kernels
that attention="tokamax" runs on an H100 cannot run on a CPU (tokamax_kernels.py)."""

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# The command line's flags registered, as whenever this runs after tests that import it: tokamax
# parses absl flags on its first call, which once failed on main's required flags.
import minitron_jax.main  # noqa: F401
from minitron_jax.models import attention, moe, tokamax_kernels
from minitron_jax.models.attention import NO_WINDOW
from minitron_jax.errors import ConfigError

needs_tokamax = pytest.mark.skipif(not tokamax_kernels.available(),
                                   reason="tokamax is not installed (pip install -e '.[test]')")

B, T, K, G, H = 2, 37, 2, 3, 8  # G > 1: grouped-query attention
SCALE = H ** -0.5
# Row 0: two documents, padding between and after a third; row 1: one document, then padding.
SEGMENTS = np.asarray([[1] * 12 + [2] * 10 + [0] * 3 + [3] * 8 + [0] * 4, [1] * 33 + [0] * 4],
                      np.int32)


def _inputs():
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (B, T, K, G, H))
  k = jax.random.normal(keys[1], (B, T, K, H))
  v = jax.random.normal(keys[2], (B, T, K, H))
  cotangent = jax.random.normal(keys[3], (B, T, K, G, H))
  return q, k, v, cotangent


def _naive(q, k, v, segments, window, softcap):
  return attention.attend(q, k, v, segment_ids=segments, window=window, scale=SCALE,
                          implementation="naive", softcap=softcap)


def _tokamax(kernel, softcap, fallback=None):
  if fallback is None:
    fallback = functools.partial(attention._blockwise, scale=SCALE, block_size=8,
                                 softcap=softcap)
  return lambda q, k, v, segments, window: tokamax_kernels.attend(
      q, k, v, segments, window, SCALE, softcap, fallback, kernel=kernel)


def _sentinel(q, *_):
  return jnp.full(q.shape, 7.0, q.dtype)


def _loss_and_grads(attend, q, k, v, cotangent, segments, window):
  """Outputs and gradients of a loss on the rows that carry one (padding rows never do); the
  window goes in traced, as a per-layer value from the model's scan does."""
  valid = (segments != 0)[:, :, None, None, None]

  def loss(q, k, v, window):
    out = jnp.where(valid, attend(q, k, v, jnp.asarray(segments), window), 0.0)
    return jnp.sum(out * cotangent), out

  grad = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)
  (_, out), grads = jax.jit(grad)(q, k, v, jnp.int32(window))
  return out, grads


def _assert_close(actual, expected, tolerance=1e-5):
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    assert np.max(np.abs(a - e)) <= tolerance * max(np.max(np.abs(e)), 1.0)


@pytest.fixture
def interpret_pallas(monkeypatch):
  """Every pallas_call in the test runs in Pallas' interpret mode (tokamax has no switch)."""
  from jax.experimental import pallas

  monkeypatch.setattr(pallas, "pallas_call",
                      functools.partial(pallas.pallas_call, interpret=True))


@needs_tokamax
@pytest.mark.parametrize("window,softcap", [(NO_WINDOW, None), (5, None), (1, None),
                                            (NO_WINDOW, 2.0), (6, 2.0)])
def test_packed_mask_on_the_xla_kernel_equals_naive(window, softcap):
  """Our causal + k_start mapping of packed segments, padding and windows, GQA head layout and
  soft-capping, forward and backward, through tokamax's own (whole score tensor) kernel."""
  q, k, v, cotangent = _inputs()
  expected = _loss_and_grads(lambda *a: _naive(*a, softcap), q, k, v, cotangent, SEGMENTS,
                             window)
  # A constant fallback (lax.cond traces both branches): any row it computed would differ.
  actual = _loss_and_grads(_tokamax("xla", softcap, _sentinel), q, k, v, cotangent, SEGMENTS,
                           window)
  _assert_close(actual, expected)


@needs_tokamax
@pytest.mark.parametrize("window", [NO_WINDOW, 5])
def test_triton_flash_kernel_in_interpret_mode_equals_naive(interpret_pallas, window):
  """The Triton flash kernel itself reading k_start (forward only: its backward kernel has no CPU
  interpret lowering)."""
  from tokamax._src.ops.attention import pallas_triton

  q, k, v, _ = _inputs()
  kernel = pallas_triton.PallasTritonFlashAttention(bypass_device_check=True)
  segments = jnp.asarray(SEGMENTS)
  out = jax.jit(lambda q, k, v, w: tokamax_kernels.attend(q, k, v, segments, w, SCALE, None,
                                                          _sentinel, kernel=kernel))(
      q, k, v, jnp.int32(window))
  valid = (SEGMENTS != 0)[:, :, None, None, None]
  _assert_close(np.where(valid, out, 0.0), np.where(valid, _naive(q, k, v, segments, window,
                                                                   None), 0.0))
  assert not np.any(np.asarray(out)[~(SEGMENTS != 0)])  # padding rows come out as zeros


@needs_tokamax
def test_reused_segment_ids_and_soft_capped_triton_fall_back():
  """A segment id after a larger one (k_start would hide keys naive shows) goes to the fallback
  at run time; Triton's backward has no soft-cap, so that goes there whole."""
  q, k, v, cotangent = _inputs()
  reused = SEGMENTS.copy()
  reused[0, 25:33] = 1  # document 1 again after document 2
  out = _tokamax("xla", None, _sentinel)(q, k, v, jnp.asarray(reused), NO_WINDOW)
  assert np.all(np.asarray(out)[reused != 0] == 7.0)
  out = _tokamax("xla", None, _sentinel)(q, k, v, jnp.asarray(SEGMENTS), NO_WINDOW)
  assert not np.any(np.asarray(out) == 7.0)
  out = _tokamax("triton", 2.0, _sentinel)(q, k, v, jnp.asarray(SEGMENTS), NO_WINDOW)
  assert np.all(np.asarray(out) == 7.0)
  # The fallback computes exactly: blockwise equals naive on the reused ids.
  _assert_close(_loss_and_grads(_tokamax("xla", None), q, k, v, cotangent, reused, 5),
                _loss_and_grads(lambda *a: _naive(*a, None), q, k, v, cotangent, reused, 5))


@needs_tokamax
def test_kernel_choice_off_gpu_and_cpu_refusal():
  assert tokamax_kernels.attention_kernel(jnp.bfloat16, None) is None  # no GPU here
  assert tokamax_kernels.grouped_kernel() == "xla"
  assert tokamax_kernels.unsharded()
  mesh = jax.sharding.AbstractMesh((2,), ("data",))
  with jax.sharding.use_abstract_mesh(mesh):
    assert not tokamax_kernels.unsharded()  # "auto" leaves tokamax alone on a mesh
  q, k, v, _ = _inputs()
  with pytest.raises(ConfigError, match="attention='tokamax' needs a CUDA GPU; this backend is"):
    attention.attend(q, k, v, segment_ids=jnp.asarray(SEGMENTS), scale=SCALE,
                     implementation="tokamax")


def test_missing_package_is_a_one_line_error(monkeypatch):
  monkeypatch.setitem(sys.modules, "tokamax", None)  # import tokamax now raises ImportError
  q, k, v, _ = _inputs()
  with pytest.raises(ConfigError, match=r"attention='tokamax' needs the tokamax package: pip "
                                        r"install 'minitron-jax\[cuda\]'"):
    tokamax_kernels.attend(q, k, v, jnp.asarray(SEGMENTS), NO_WINDOW, SCALE, None, None)
  with pytest.raises(ConfigError, match=r"moe_dispatch='tokamax' needs the tokamax package"):
    tokamax_kernels.ragged_dot(jnp.ones((3, 2)), jnp.ones((1, 2, 4)), jnp.asarray([3]))


@needs_tokamax
def test_tokamax_grouped_dispatch_equals_capacity_values_and_gradients():
  """The exact capacity dispatch (every token) is the reference; test_moe checks it against a
  dense per-expert computation."""
  keys = jax.random.split(jax.random.key(1), 5)
  b, t, d, e, f, k = 2, 7, 8, 5, 6, 2
  x = jax.random.normal(keys[0], (b, t, d))
  gate, up = (jax.random.normal(keys[i], (e, d, f)) / 3 for i in (1, 2))
  down = jax.random.normal(keys[3], (e, f, d)) / 3
  weights, indices = moe.route(jax.random.normal(keys[4], (b, t, e)), k, normalize=True)

  def loss(x, gate, up, down, implementation):
    outputs, act = moe.experts(x, indices, gate, up, down, jax.nn.silu,
                               implementation=implementation)
    mixed = jnp.einsum("BTKD,BTK->BTD", outputs, weights)
    return jnp.sum(jnp.sin(mixed)) + jnp.sum(jnp.cos(act)), (mixed, act)

  def run(implementation):
    grad = jax.value_and_grad(loss, (0, 1, 2, 3), has_aux=True)
    (_, outputs), grads = jax.jit(grad, static_argnums=4)(x, gate, up, down, implementation)
    return outputs, grads

  _assert_close(run("tokamax"), run("capacity"))
  unrouted = np.setdiff1d(np.arange(e), np.asarray(indices))
  grads = run("tokamax")[1]
  for expert in unrouted:  # an expert no token picked gets no gradient
    assert not np.any(np.asarray(grads[1][expert]))


@needs_tokamax
def test_model_config_selects_the_tokamax_dispatch():
  from minitron_jax.models import config as config_lib, model

  config = config_lib.tiny("qwen3_moe")
  params = model.init(config, 0)
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, 9)))
  logits = {dispatch: model.apply(config.replace(moe_dispatch=dispatch), params, tokens)
            for dispatch in ("capacity", "tokamax")}
  _assert_close(logits["tokamax"], logits["capacity"])
  with pytest.raises(ConfigError, match="moe_dispatch='dense' is not supported; allowed"):
    config.replace(moe_dispatch="dense")
