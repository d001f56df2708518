"""The forward pass on a 2x2x2 (data x fsdp x tensor) mesh of simulated CPU devices, and mixtures
of experts (forward and a distillation step) on a 2x2x2 data x tensor x expert mesh."""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minitron_jax.models import config as config_lib
from minitron_jax.models import model, partitioning, sharding
from minitron_jax.training import distill
from minitron_jax.errors import ConfigError
from minitron_jax.objectives.losses import LossConfig

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import distill_job  # noqa: E402


@pytest.fixture(scope="module")
def mesh():
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (tests/conftest.py sets --xla_force_host_platform_device_count)")
  return partitioning.make_mesh(partitioning.MeshConfig(data=2, fsdp=2, tensor=2))


def _one_device_and_sharded(family, mesh):
  """(config, params sharded over `mesh`, a function from params to logits of fixed tokens put
  on the mesh's batch axes, the logits on one device)."""
  config = config_lib.tiny(family)
  params = model.init(config, 0)
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 256, (4, 16)))
  expected = model.apply(config, params, tokens)
  placed = jax.device_put(tokens, partitioning.batch_sharding(mesh, tokens.shape))
  forward = lambda sharded: model.apply(config, sharded, placed)
  return config, sharding.shard_params(config, params, mesh), forward, expected


@pytest.mark.parametrize("family", config_lib.FAMILIES)
def test_sharded_forward_matches_one_device(mesh, family):
  _, sharded, forward, expected = _one_device_and_sharded(family, mesh)
  q_proj = sharded["layers"]["attn"]["q_proj"]
  assert q_proj.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  assert len(q_proj.addressable_shards) == 8
  np.testing.assert_allclose(forward(sharded), expected, rtol=1e-5, atol=1e-6)


def test_sharded_init_places_params_directly(mesh):
  config = config_lib.tiny("qwen2")
  params = model.init(config, 3, out_shardings=sharding.param_shardings(config, mesh))
  expected = model.init(config, 3)
  jax.tree.map(np.testing.assert_array_equal, params, expected)
  assert params["embed"].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")


def test_indivisible_dimension_is_replicated(mesh):
  # One KV head cannot be split over tensor=2, so that axis is replicated instead of failing.
  spec = partitioning.logical_to_spec(("layers", "embed", "kv_heads", "head_dim"), (2, 64, 1, 16), mesh)
  assert spec == jax.sharding.PartitionSpec(None, "fsdp", None, None)
  # The batch also goes over `expert`, of size 1 here (a no-op split).
  assert partitioning.batch_sharding(mesh, (4, 8)).spec == jax.sharding.PartitionSpec(
      ("data", "fsdp", "expert"), None)
  assert partitioning.batch_sharding(mesh, (2, 8)).spec == jax.sharding.PartitionSpec(
      ("data", "expert"), None)


@pytest.mark.parametrize("mesh_config, devices, message", [
    (partitioning.MeshConfig(data=3, fsdp=1, tensor=1), 8, "needs 3 devices; 8 are available"),
    (partitioning.MeshConfig(data=-1, fsdp=3, tensor=1), 8, "does not divide 8 devices"),
    (partitioning.MeshConfig(data=-1, fsdp=-1, tensor=1), 8, "at most one -1"),
])
def test_bad_mesh_is_a_one_line_error(mesh_config, devices, message):
  with pytest.raises(ConfigError, match=message):
    mesh_config.shape(devices)


def test_mesh_fills_the_free_axis():
  assert partitioning.MeshConfig(data=-1, fsdp=2, tensor=2).shape(8) == (2, 2, 2, 1)
  assert partitioning.MeshConfig().shape(8) == (8, 1, 1, 1)
  assert partitioning.MeshConfig(data=2, expert=4).shape(8) == (2, 1, 1, 4)


def test_activations_are_split_over_the_batch_under_fsdp():
  """With the run's mesh set, each device computes its own sequences: GSPMD alone follows the
  FSDP-split weights and gives every device the whole batch."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices")
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=1, fsdp=8, tensor=1))
  config = config_lib.tiny("llama")
  params = sharding.shard_params(config, model.init(config, 0), mesh)
  tokens = np.random.RandomState(0).randint(0, 256, (8, 16)).astype(np.int32)
  tokens = jax.device_put(tokens, partitioning.batch_sharding(mesh, tokens.shape))

  def per_device_rows(mesh_in_context):
    with jax.set_mesh(mesh_in_context):
      _, kept = model.hidden_states(config, params, tokens,
                                    intermediates_fn=lambda inter: inter["mlp_act"])
    return kept.sharding.shard_shape(kept.shape)[1]  # kept [L,B,T,F]

  assert per_device_rows(mesh) == 1
  assert per_device_rows(None) == 8  # what the constraint fixes


@pytest.fixture(scope="module")
def expert_mesh():
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (tests/conftest.py sets --xla_force_host_platform_device_count)")
  return partitioning.make_mesh(partitioning.MeshConfig(data=2, fsdp=1, tensor=2, expert=2))


def _place_batch(mesh, batch):
  return {k: jax.device_put(v, partitioning.batch_sharding(mesh, v.shape)) for k, v in batch.items()}


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe"])  # qwen2_moe: a shared expert
def test_experts_are_split_over_the_expert_axis_and_match_one_device(expert_mesh, family):
  config, sharded, forward, expected = _one_device_and_sharded(family, expert_mesh)
  experts = sharded["layers"]["moe"]
  spec = jax.sharding.PartitionSpec
  assert experts["gate_proj"].sharding.spec == spec(None, "expert", "fsdp", "tensor")
  assert experts["up_proj"].sharding.spec == spec(None, "expert", "fsdp", "tensor")
  assert experts["down_proj"].sharding.spec == spec(None, "expert", "tensor", "fsdp")
  assert experts["router"].sharding.spec == spec(None, "fsdp", "expert")
  # Each device holds half the experts (and half of each one's width).
  assert experts["gate_proj"].sharding.shard_shape(experts["gate_proj"].shape) == (
      config.num_layers, config.num_experts // 2, config.hidden_size,
      config.moe_intermediate_size // 2)
  if config.shared_expert_intermediate_size:
    assert experts["shared"]["up_proj"].sharding.spec == spec(None, "fsdp", "tensor")
  np.testing.assert_allclose(forward(sharded), expected, rtol=1e-5, atol=1e-6)


def test_moe_distillation_step_on_the_expert_mesh_matches_one_device(expert_mesh):
  teacher_config = config_lib.tiny("qwen3_moe", num_layers=3)
  student_config = config_lib.tiny("qwen3_moe", num_experts=4)
  teacher, student = model.init(teacher_config, 0), model.init(student_config, 1)
  # warmup 0: the one step applies the peak rate (a warmup's first step would change nothing).
  distiller = distill.Distiller(
      student_config, teacher_config, LossConfig(hidden_loss="cosine", router_aux_loss_coef=0.01),
      distill.OptimizerConfig(warmup_steps=0), 10)
  batch = distill_job.batches(1, 0)[0]

  def step(teacher, student, batch):
    state = distiller.init_state(jax.tree.map(jnp.copy, student))  # train_step donates it
    return distiller.train_step(state, teacher, batch)

  expected_state, expected = step(teacher, student,
                                  {k: jnp.asarray(v) for k, v in batch.items()})
  state, metrics = step(sharding.shard_params(teacher_config, teacher, expert_mesh),
                        sharding.shard_params(student_config, student, expert_mesh),
                        _place_batch(expert_mesh, batch))
  assert set(metrics) >= {"loss", "logit_loss", "hidden_loss", "router_aux"}
  for name in expected:
    np.testing.assert_allclose(metrics[name], expected[name], rtol=1e-5, err_msg=name)
  # Adam's first update is about lr x sign(gradient), so the tolerance is 1% of the rate.
  atol = 0.01 * distiller.optimizer_config.peak_lr
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=atol),
               state["trainable"], expected_state["trainable"])
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                       expected_state["trainable"]["student"], student)
  assert min(jax.tree.leaves(moved)) > 10 * atol
  gate_proj = state["trainable"]["student"]["layers"]["moe"]["gate_proj"]
  assert gate_proj.sharding.spec[1] == "expert" and len(gate_proj.sharding.device_set) == 8
