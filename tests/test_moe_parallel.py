"""Expert parallelism by all-to-all: on a mesh each device routes its own tokens, sends each
expert's share to the device holding it and computes only its own experts; values and gradients
equal the one-device dispatch and a dense every-expert reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from minitron_jax.models import config as config_lib
from minitron_jax.models import model, moe, partitioning, sharding
from minitron_jax.tools import scaling

B, T, D, E, F, K = 8, 6, 8, 8, 4, 2
MESHES = {"data2_expert4": dict(data=2, expert=4), "expert4_tensor2": dict(expert=4, tensor=2),
          "data8": dict(data=8), "fsdp2_expert4": dict(fsdp=2, expert=4)}


def _inputs():
  keys = jax.random.split(jax.random.key(0), 5)
  x = jax.random.normal(keys[0], (B, T, D))
  gate, up = (jax.random.normal(keys[i], (E, D, F)) / 3 for i in (1, 2))
  down = jax.random.normal(keys[3], (E, F, D)) / 3
  return x, gate, up, down, jax.random.normal(keys[4], (B, T, E))


def _layer(x, gate, up, down, logits, factor=None):
  weights, indices = moe.route(logits, K, normalize=True)
  outputs, act = moe.experts(x, indices, gate, up, down, jax.nn.silu, factor,
                             implementation="capacity")
  return jnp.einsum("BTKD,BTK->BTD", outputs, weights), act


def _dense(x, gate, up, down, logits):
  """Every expert on every token, masked by the routing: no sorting, no dispatch."""
  weights, indices = moe.route(logits, K, normalize=True)
  h = jax.nn.silu(jnp.einsum("btd,edf->btef", x, gate)) * jnp.einsum("btd,edf->btef", x, up)
  mask = jnp.sum(jax.nn.one_hot(indices, E) * weights[..., None], axis=2)  # [B,T,E]
  return jnp.einsum("btef,efd,bte->btd", h, down, mask)


def _place(mesh, x, gate, up, down, logits):
  rows = lambda a: jax.device_put(a, partitioning.batch_sharding(mesh, a.shape))  # noqa: E731
  weight = lambda a, axes: jax.device_put(  # noqa: E731
      a, NamedSharding(mesh, partitioning.logical_to_spec(axes, a.shape, mesh)))
  return (rows(x), weight(gate, ("experts", "embed", "moe_mlp")),
          weight(up, ("experts", "embed", "moe_mlp")),
          weight(down, ("experts", "moe_mlp", "embed")), rows(logits))


def _loss(fn):
  return lambda x, gate, up, down, logits: jnp.sum(jnp.sin(fn(x, gate, up, down, logits)))


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_values_and_gradients_equal_one_device_and_the_dense_reference(mesh_name):
  args = _inputs()
  layer = lambda *a: _layer(*a)[0]  # noqa: E731
  grad = jax.jit(jax.value_and_grad(_loss(layer), argnums=(0, 1, 2, 3, 4)))
  want_value, want_grads = jax.jit(jax.value_and_grad(_loss(_dense), argnums=(0, 1, 2, 3, 4)))(
      *args)
  one_value, one_grads = grad(*args)
  mesh = partitioning.make_mesh(partitioning.MeshConfig(**MESHES[mesh_name]))
  with jax.set_mesh(mesh):
    placed = _place(mesh, *args)
    value, grads = grad(*placed)
    _, act = jax.jit(_layer)(*placed)
    hlo = grad.lower(*placed).compile().as_text()
  np.testing.assert_allclose(value, want_value, rtol=1e-5)
  np.testing.assert_allclose(value, one_value, rtol=1e-5)
  for got, one, want in zip(grads, one_grads, want_grads):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got, one, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(act, jax.jit(_layer)(*args)[1], rtol=1e-5, atol=1e-6)
  ops = dict(scaling.collectives(hlo))
  if MESHES[mesh_name].get("expert", 1) > 1:
    assert "all-to-all" in ops
  weights = scaling.weight_shapes(args[1:4])
  assert scaling.activation_gathers(hlo, weights) == (), ops


def test_a_capacity_factor_drops_per_device():
  """With a capacity factor each device's experts take C of its own pairs: at E/K, C is the
  device's tokens and nothing drops; below it some pairs drop and the output stays finite."""
  args = _inputs()
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=2, expert=4))
  with jax.set_mesh(mesh):
    placed = _place(mesh, *args)
    roomy = jax.jit(lambda *a: _layer(*a, factor=E / K)[0])(*placed)
    tight = jax.jit(lambda *a: _layer(*a, factor=0.5)[0])(*placed)
  exact = jax.jit(lambda *a: _layer(*a)[0])(*args)
  np.testing.assert_allclose(roomy, exact, rtol=1e-5, atol=1e-6)
  assert np.all(np.isfinite(tight)) and not np.allclose(tight, exact)


def test_a_mixture_model_on_an_expert_mesh_equals_one_device():
  config = config_lib.tiny("qwen3_moe", num_experts=8)
  params = model.init(config, seed=2)
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, config.vocab_size, (8, 12)))
  loss = lambda p, tokens: jnp.sum(jnp.sin(model.apply(config, p, tokens)))  # noqa: E731
  want = jax.jit(jax.value_and_grad(loss))(params, tokens)
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=2, expert=4))
  with jax.set_mesh(mesh):
    got = jax.jit(jax.value_and_grad(loss))(
        sharding.shard_params(config, params, mesh),
        jax.device_put(tokens, partitioning.batch_sharding(mesh, tokens.shape)))
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  # Per-device partial sums add in another order: round-off relative to each gradient's scale.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=0, atol=1e-5 * float(np.max(np.abs(b)))), got[1], want[1])
