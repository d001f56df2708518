"""Memory plans from abstract shapes against the real thing on a 2x2x2 mesh of simulated CPUs:
the same per-device state bytes as a real train state, the same compiled memory as the real
jitted programs on real arrays, and a max-batch search that stops where the batch stops fitting."""

import importlib.util
import pathlib

import jax
import numpy as np
import pytest

from minitron_jax.compress import importance
from minitron_jax.models import model, partitioning, sharding
from minitron_jax.run import run_config
from minitron_jax.tools import memory_plan
from minitron_jax.training import distill
from minitron_jax.errors import ConfigError

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def mesh():
  return partitioning.make_mesh(partitioning.MeshConfig(data=2, fsdp=2, tensor=2))


@pytest.fixture(scope="module")
def cfg():
  """The shipped tiny teacher pruned to 3 layers and MLP 256; a hidden-state loss (so the state
  holds a projection too) and two micro-batches per step."""
  config = run_config.base_config()
  config.stages = ("importance", "prune", "distill")
  config.importance.update(batch_size=4, seq_len=16, block_sizes=(1, 2), drop_loss=False)
  config.distill.update(batch_size=8, seq_len=16)
  config.distill.loss.update(hidden_loss="cosine", hidden_pairs=((-1, -1),))
  config.distill.optimizer.accumulation_steps = 2
  return config


@pytest.fixture(scope="module")
def planned(cfg, mesh):
  return {p.name: p for p in memory_plan.programs(cfg, mesh)}


@pytest.fixture(scope="module")
def real(cfg, mesh):
  """What retrain.retrain builds and holds: placed params, the Distiller, its train state."""
  source, student_config, teacher_config = memory_plan.stage_models(cfg)
  run = memory_plan.distill_retraining(memory_plan.run_plan(cfg)).for_models(student_config,
                                                                            teacher_config)
  distiller = distill.Distiller(run.student_config, run.teacher_config, run.losses, run.optimizer,
                                cfg.distill.steps)
  teacher = model.init(run.teacher_config, 0,
                       out_shardings=sharding.param_shardings(run.teacher_config, mesh))
  student = model.init(run.student_config, 1,
                       out_shardings=sharding.param_shardings(run.student_config, mesh))
  return dict(source=source, distiller=distiller, teacher=teacher,
              state=distiller.init_state(student))


def _batch(mesh, batch_size, seq_len):
  tokens = np.random.default_rng(0).integers(0, 256, (batch_size, seq_len)).astype(np.int32)
  arrays = dict(tokens=tokens, segment_ids=np.ones_like(tokens),
                positions=np.broadcast_to(np.arange(seq_len, dtype=np.int32), tokens.shape))
  return {k: jax.device_put(v, partitioning.batch_sharding(mesh, v.shape)) for k, v in arrays.items()}


def test_state_bytes_are_the_real_states_shard_bytes(planned, real, mesh):
  abstract = memory_plan.abstract_state(
      real["distiller"], memory_plan.abstract_params(real["distiller"].student_config, mesh), mesh)
  # Leaf by leaf: the shape a device holds, and that the real leaf is placed on the mesh.
  assert (jax.tree.map(lambda s: s.sharding.shard_shape(s.shape), abstract)
          == jax.tree.map(lambda a: a.addressable_shards[0].data.shape, real["state"]))
  expected = memory_plan.state_bytes(real["state"], real["teacher"])
  assert planned["distill"].state == expected
  assert expected.optimizer > 2 * expected.params > 0 and expected.other > 0
  # ...and the bytes really sitting on one device.
  device = mesh.devices.flat[0]
  on_device = sum(shard.data.nbytes
                  for leaf in jax.tree.leaves((real["state"], real["teacher"]))
                  for shard in leaf.addressable_shards if shard.device == device)
  assert planned["distill"].state.total == on_device


def test_compiled_memory_matches_the_real_programs(planned, real, cfg, mesh):
  plan = memory_plan.measure(planned["distill"])
  batch = _batch(mesh, cfg.distill.batch_size, cfg.distill.seq_len)
  with jax.set_mesh(mesh):  # as pipeline.run traces every stage
    compiled = real["distiller"].train_step.lower(real["state"], real["teacher"], batch).compile()
  assert plan.memory == memory_plan.CompiledMemory.of(compiled)
  assert plan.memory.alias > 0  # the state is donated
  assert plan.per_device_batch == 1  # 8 sequences over data x fsdp = 4, two micro-batches

  params = jax.device_put(model.init(real["source"], 0),
                          sharding.param_shardings(real["source"], mesh))
  batch = _batch(mesh, cfg.importance.batch_size, cfg.importance.seq_len)
  with jax.set_mesh(mesh):
    compiled = importance._batch_statistics.lower(
        real["source"], params, batch["tokens"], batch["segment_ids"], batch["positions"],
        block_sizes=(1, 2)).compile()
  assert (memory_plan.measure(planned["importance"]).memory
          == memory_plan.CompiledMemory.of(compiled))


def test_max_batch_fits_and_one_more_does_not(planned):
  program = planned["importance"]
  peaks = {b: memory_plan.measure(program, b * program.batch_multiple).memory.peak
           for b in (3, 4)}
  assert peaks[3] < peaks[4]
  found = memory_plan.max_batch(program, (peaks[3] + peaks[4]) // 2)
  assert (found.per_device_batch, found.global_batch, found.capped) == (3, 12, False)
  tried = dict(found.tried)
  assert tried[3] <= found.hbm_bytes < tried[4]

  assert memory_plan.max_batch(program, 1).per_device_batch == 0
  capped = memory_plan.max_batch(program, 2**40, limit=3)
  assert (capped.per_device_batch, capped.capped) == (3, True)


def _config(name: str, arg: str = ""):
  spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_stage_models_follow_the_compression_plan():
  cfg = _config("nemotron4_15b_to_4b")
  source, student, teacher = memory_plan.stage_models(cfg, 1)
  assert (round(source.num_params() / 1e9, 1), round(student.num_params() / 1e9, 1),
          round(teacher.num_params() / 1e9, 1)) == (8.3, 4.2, 15.6)
  assert student.dtype == "bfloat16"  # the model section's compute settings
  cfg.model.attention = "naive"
  assert {c.attention for c in memory_plan.stage_models(cfg, 1)} == {"naive"}
  with pytest.raises(ConfigError, match="stage=2 is outside the run's 2 compression stage"):
    memory_plan.stage_models(cfg, 2)


def test_paper_config_programs_are_built_from_shapes(mesh):
  """Full-size programs on the test mesh: built without allocating, exact state bytes."""
  cfg = _config("llama3_1_8b_to_4b", "variant=depth")
  found = {p.name: p for p in memory_plan.programs(cfg, mesh)}
  assert list(found) == ["teacher_correction", "importance", "drop_loss", "distill"]
  teacher = found["distill"].state.teacher_params
  # Llama-3.1-8B in float32 over fsdp=2 x tensor=2 (the vocabulary splits over tensor too).
  assert found["importance"].state.params == teacher
  assert 8.0e9 * 4 / 4 < teacher < 8.1e9 * 4 / 4
  assert found["distill"].state.optimizer == 2 * found["distill"].state.params + 8  # 2 counts
  assert found["distill"].batch_multiple == 4 * 16
  with pytest.raises(ConfigError, match="programs \\['train'\\] are unknown"):
    memory_plan.programs(cfg, mesh, names=("train",))
