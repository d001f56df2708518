"""The Mamba-2 mixer: the chunked scan against a float64 loop, the mixer against transformers'
NemotronHMamba2Mixer in values and gradients, packed rows against separate documents, and a
cached continuation against one pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hf_reference import assert_close_relative, torch, transformers
from minitron_jax.errors import ConfigError
from minitron_jax.models import mamba2, ssd

FP32_TOLERANCE = 1e-5
# Gradients through the scan's exp and the softplus: transformers' own float32 backward is 1.65e-5
# from its float64 one on these inputs (measured), so ours is held to twice that.
FP32_GRAD_TOLERANCE = 3e-5
# Heads 4 in 2 groups, head_dim 3, state 5: every size distinct, so a swapped axis fails.
HEADS, HEAD_DIM, GROUPS, STATE, HIDDEN = 4, 3, 2, 5, 16


def _scan_inputs(seed=0, batch=2, length=37):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch, length, HEADS, HEAD_DIM))
  dt = np.log1p(np.exp(rng.normal(size=(batch, length, HEADS)))) * 0.5
  A = -np.exp(rng.normal(size=HEADS))
  B, C = (rng.normal(size=(batch, length, GROUPS, STATE)) for _ in range(2))
  D = rng.normal(size=HEADS)
  segments = np.ones((batch, length), np.int32)
  segments[0, 10:], segments[0, 30:] = 2, 3  # three documents, one starting inside a chunk
  segments[1, :3] = 0  # left padding
  return x, dt, A, B, C, D, segments


def _scan_float64(x, dt, A, B, C, D, segments, initial=None):
  """The recurrence of ssd.py's docstring, one head and one position at a time."""
  batch, length, heads, head_dim = x.shape
  per_group = heads // B.shape[2]
  y = np.zeros_like(x)
  finals = []
  for b in range(batch):
    h = np.zeros((heads, head_dim, B.shape[-1])) if initial is None else initial[b].copy()
    for t in range(length):
      if t and segments[b, t] != segments[b, t - 1]:
        h[:] = 0
      for m in range(heads):
        g = m // per_group
        h[m] = np.exp(dt[b, t, m] * A[m]) * h[m] + dt[b, t, m] * np.outer(x[b, t, m], B[b, t, g])
        y[b, t, m] = h[m] @ C[b, t, g] + D[m] * x[b, t, m]
    finals.append(h)
  return y, np.stack(finals)


@pytest.mark.parametrize("chunk_size", [4, 8, 64])
@pytest.mark.parametrize("with_initial_state", [False, True])
def test_chunked_scan_equals_float64_recurrence(chunk_size, with_initial_state):
  inputs = _scan_inputs()
  initial = (np.random.default_rng(1).normal(size=(2, HEADS, HEAD_DIM, STATE))
             if with_initial_state else None)
  expected_y, expected_state = _scan_float64(*inputs, initial)
  as32 = [jnp.asarray(a, jnp.float32) for a in inputs[:6]]
  y, state = ssd.ssd_chunked(*as32, jnp.asarray(inputs[6]), chunk_size=chunk_size,
                             initial_state=None if initial is None else jnp.asarray(initial))
  assert_close_relative(y, expected_y, FP32_TOLERANCE)
  assert_close_relative(state, expected_state, FP32_TOLERANCE)
  y_seq, state_seq = ssd.ssd_sequential(
      *as32, jnp.asarray(inputs[6]), initial_state=None if initial is None else jnp.asarray(initial))
  assert_close_relative(y_seq, expected_y, FP32_TOLERANCE)
  assert_close_relative(state_seq, expected_state, FP32_TOLERANCE)


def test_chunked_scan_gradients_equal_sequential():
  inputs = _scan_inputs(length=21)
  as32 = [jnp.asarray(a, jnp.float32) for a in inputs[:6]]
  segments = jnp.asarray(inputs[6])
  weights = jnp.asarray(np.random.default_rng(2).normal(size=inputs[0].shape), jnp.float32)

  def loss(scan, *args):
    y, state = scan(*args, segments)
    return jnp.sum(y * weights) + jnp.sum(state)

  chunked = jax.grad(lambda *a: loss(lambda *b: ssd.ssd_chunked(*b, chunk_size=8), *a),
                     argnums=tuple(range(6)))(*as32)
  sequential = jax.grad(lambda *a: loss(ssd.ssd_sequential, *a), argnums=tuple(range(6)))(*as32)
  for got, want in zip(chunked, sequential):
    assert_close_relative(got, want, 1e-5)


def _hf_mixer(seed=0, **overrides):
  fields = dict(vocab_size=32, hidden_size=HIDDEN, layers_block_type=["linear_attention"],
                mamba_num_heads=HEADS, mamba_head_dim=HEAD_DIM, n_groups=GROUPS,
                ssm_state_size=STATE, conv_kernel=4, chunk_size=8, layer_norm_epsilon=1e-5,
                time_step_limit=(0.01, 2.0), use_conv_bias=True)
  fields.update(overrides)
  config = transformers.NemotronHConfig(**fields)
  torch.manual_seed(seed)
  mixer = transformers.models.nemotron_h.modeling_nemotron_h.NemotronHMamba2Mixer(
      config, layer_idx=0).double()
  with torch.no_grad():
    for name, param in mixer.named_parameters():
      param.copy_(torch.randn_like(param) * (0.5 if "proj" in name or "conv" in name else 0.3)
                  + (1.0 if name == "norm.weight" else 0.0))
  return config, mixer


def mamba_config_from_hf(config) -> mamba2.Mamba2Config:
  """Our mixer's config from a transformers NemotronHConfig."""
  return mamba2.Mamba2Config(
      num_heads=config.mamba_num_heads, head_dim=config.mamba_head_dim,
      state_size=config.ssm_state_size, num_groups=config.n_groups,
      conv_kernel=config.conv_kernel, chunk_size=config.chunk_size,
      conv_bias=config.use_conv_bias, time_step_limit=tuple(config.time_step_limit))


def _our_mixer(config, mixer) -> tuple[mamba2.Mamba2Mixer, mamba2.Mamba2Config]:
  ours = mamba_config_from_hf(config)
  module = mamba2.Mamba2Mixer(ours, config.hidden_size, config.layer_norm_epsilon, "float32",
                              nnx.Rngs(0))
  w = {k: v.detach().numpy().astype(np.float32) for k, v in mixer.state_dict().items()}
  values = mixer_params_from_hf(w, "", ours, config.hidden_size)
  for name, value in values.items():
    getattr(module, name)[...] = jnp.asarray(value)
  return module, ours


def mixer_params_from_hf(w: dict, prefix: str, mamba: mamba2.Mamba2Config, hidden: int) -> dict:
  """Our mixer's weights from a NemotronHMamba2Mixer's float32 state dict `w` (names under
  `prefix`): the fused in_proj rows [z | x | B | C | dt] and conv1d channels [x | B | C] split."""
  m, p, g, n = mamba.num_heads, mamba.head_dim, mamba.num_groups, mamba.state_size
  i, gn, d = m * p, g * n, hidden
  z, x, b, c, dt = np.split(w[prefix + "in_proj.weight"], np.cumsum([i, i, gn, gn]), axis=0)
  conv = w[prefix + "conv1d.weight"][:, 0, :]  # [channels, W]
  conv_x, conv_b, conv_c = np.split(conv, [i, i + gn], axis=0)
  bias_x, bias_b, bias_c = np.split(w[prefix + "conv1d.bias"], [i, i + gn])
  return dict(
      in_z=z.T.reshape(d, m, p), in_x=x.T.reshape(d, m, p), in_B=b.T.reshape(d, g, n),
      in_C=c.T.reshape(d, g, n), in_dt=dt.T,
      conv_x=conv_x.T.reshape(-1, m, p), conv_B=conv_b.T.reshape(-1, g, n),
      conv_C=conv_c.T.reshape(-1, g, n), conv_x_bias=bias_x.reshape(m, p),
      conv_B_bias=bias_b.reshape(g, n), conv_C_bias=bias_c.reshape(g, n),
      A_log=w[prefix + "A_log"], D=w[prefix + "D"], dt_bias=w[prefix + "dt_bias"],
      norm=w[prefix + "norm.weight"].reshape(m, p),
      out_proj=w[prefix + "out_proj.weight"].T.reshape(m, p, d))


def _inputs(batch=2, length=19, seed=3):
  return np.random.default_rng(seed).normal(size=(batch, length, HIDDEN))


def test_mixer_equals_transformers():
  config, mixer = _hf_mixer()
  module, _ = _our_mixer(config, mixer)
  x = _inputs()
  with torch.no_grad():
    expected = mixer(torch.tensor(x)).numpy()
  ones = jnp.ones(x.shape[:2], jnp.int32)
  out, inter, _ = module(jnp.asarray(x, jnp.float32), ones)
  assert_close_relative(out, expected, FP32_TOLERANCE)
  assert inter["mamba_x"].shape == inter["mamba_out"].shape == (2, 19, HEADS, HEAD_DIM)


def test_mixer_gradients_equal_transformers():
  config, mixer = _hf_mixer(seed=1)
  module, _ = _our_mixer(config, mixer)
  x = _inputs(length=13)
  weights = np.random.default_rng(4).normal(size=(2, 13, HIDDEN))
  x_torch = torch.tensor(x, requires_grad=True)
  (mixer(x_torch) * torch.tensor(weights)).sum().backward()
  graphdef, state = nnx.split(module)
  ones = jnp.ones(x.shape[:2], jnp.int32)

  def loss(state, x):
    out, _, _ = nnx.merge(graphdef, state)(x, ones)
    return jnp.sum(out * jnp.asarray(weights, jnp.float32))

  grads, grad_x = jax.grad(loss, argnums=(0, 1))(state, jnp.asarray(x, jnp.float32))
  assert_close_relative(grad_x, x_torch.grad.numpy(), FP32_GRAD_TOLERANCE)
  i = HEADS * HEAD_DIM
  torch_grads = dict(mixer.named_parameters())
  assert_close_relative(grads["in_x"][...].reshape(HIDDEN, i).T,
                        torch_grads["in_proj.weight"].grad.numpy()[i:2 * i], FP32_GRAD_TOLERANCE)
  assert_close_relative(grads["out_proj"][...].reshape(i, HIDDEN).T,
                        torch_grads["out_proj.weight"].grad.numpy(), FP32_GRAD_TOLERANCE)
  for name in ("A_log", "D", "dt_bias"):
    assert_close_relative(grads[name][...], torch_grads[name].grad.numpy(), FP32_GRAD_TOLERANCE)
  assert_close_relative(grads["norm"][...].reshape(-1), torch_grads["norm.weight"].grad.numpy(),
                        FP32_GRAD_TOLERANCE)
  assert_close_relative(grads["conv_x"][...].reshape(4, i).T,
                        torch_grads["conv1d.weight"].grad.numpy()[:i, 0], FP32_GRAD_TOLERANCE)


def test_packed_rows_equal_separate_documents_in_values_and_gradients():
  config, mixer = _hf_mixer(seed=2)
  module, _ = _our_mixer(config, mixer)
  graphdef, state = nnx.split(module)
  lengths = (7, 2, 11)  # one document shorter than the convolution window
  x = jnp.asarray(_inputs(batch=1, length=sum(lengths)), jnp.float32)
  segments = jnp.asarray(np.repeat(np.arange(1, 4), lengths)[None], jnp.int32)
  weights = jnp.asarray(np.random.default_rng(5).normal(size=x.shape), jnp.float32)

  def run(state, x, segment_ids):
    out, _, _ = nnx.merge(graphdef, state)(x, segment_ids)
    return out

  def packed_loss(state, x):
    return jnp.sum(run(state, x, segments) * weights)

  def separate_loss(state, x):
    total, start = 0.0, 0
    for length in lengths:
      piece = slice(start, start + length)
      total += jnp.sum(run(state, x[:, piece], jnp.ones((1, length), jnp.int32))
                       * weights[:, piece])
      start += length
    return total

  packed = jnp.concatenate([
      run(state, x[:, s:s + n], jnp.ones((1, n), jnp.int32))
      for s, n in zip(np.cumsum((0,) + lengths[:-1]), lengths)], axis=1)
  assert_close_relative(run(state, x, segments), packed, FP32_TOLERANCE)
  packed_grads = jax.grad(packed_loss, argnums=(0, 1))(state, x)
  separate_grads = jax.grad(separate_loss, argnums=(0, 1))(state, x)
  for got, want in zip(jax.tree.leaves(packed_grads), jax.tree.leaves(separate_grads)):
    assert_close_relative(got, want, FP32_TOLERANCE)


def test_cached_continuation_equals_one_pass():
  config, mixer = _hf_mixer(seed=3)
  module, ours = _our_mixer(config, mixer)
  x = jnp.asarray(_inputs(length=12), jnp.float32)
  # Row 1 is left-padded with 2 tokens: padding is its own document, as generation feeds it.
  segments = jnp.asarray(np.array([[1] * 12, [0, 0] + [1] * 10]), jnp.int32)
  whole, _, _ = module(x, segments)
  cache = mamba2.MambaCache.zeros(ours, 2)
  first, _, cache = module(x[:, :5], segments[:, :5], cache)
  pieces = [first]
  for t in range(5, 12):
    out, _, cache = module(x[:, t:t + 1], segments[:, t:t + 1], cache)
    pieces.append(out)
  assert_close_relative(jnp.concatenate(pieces, axis=1), whole, FP32_TOLERANCE)


def test_left_padding_equals_transformers_attention_mask():
  config, mixer = _hf_mixer(seed=4)
  module, _ = _our_mixer(config, mixer)
  x = _inputs(length=10)
  mask = np.ones((2, 10), np.int64)
  mask[1, :3] = 0
  with torch.no_grad():
    expected = mixer(torch.tensor(x), attention_mask=torch.tensor(mask)).numpy()
  out, _, _ = module(jnp.asarray(x, jnp.float32), jnp.asarray(mask, jnp.int32))
  assert_close_relative(np.asarray(out)[:, 3:], expected[:, 3:], FP32_TOLERANCE)
  assert_close_relative(np.asarray(out)[0], expected[0], FP32_TOLERANCE)


@pytest.mark.parametrize("fields,message", [
    (dict(num_heads=6, num_groups=4), "num_heads=6 must be a multiple of num_groups=4"),
    (dict(chunk_size=0), "chunk_size=0 must be a positive integer"),
    (dict(time_step_limit=(0.5, 0.1)), "time_step_limit=(0.5, 0.1)"),
])
def test_bad_mixer_config_is_refused_in_one_line(fields, message):
  base = dict(num_heads=4, head_dim=3, state_size=5, num_groups=2)
  with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
    mamba2.Mamba2Config(**{**base, **fields})
