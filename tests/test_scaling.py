"""Replicated work caught in the compiled programs (never timed here: see
experiments/benchmarks/scaling.py for the time ratios): on 8 devices no training program gathers
activations, and each device's temporary memory shrinks with its share of the batch."""

from __future__ import annotations

import functools

import pytest

from minitron_jax.models import config as config_lib
from minitron_jax.tools import scaling

TEACHER = config_lib.tiny("llama", vocab_size=512, hidden_size=64, num_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                          intermediate_size=128)
SETUP = scaling.Setup(TEACHER, TEACHER.replace(intermediate_size=64), batch=8, seq=32, top_k=16)


def test_gathers_of_activations_are_found():
  hlo = ("%a = f32[8,32,64]{2,1,0} all-gather(f32[1,32,64]{2,1,0} %x)\n"
         "%b = f32[64,512]{1,0} all-gather(f32[8,512]{1,0} %w)\n"
         "%c = (f32[], f32[64,512]{1,0}) all-reduce(f32[] %l, f32[64,512]{1,0} %g)\n")
  assert scaling.collectives(hlo) == [("all-gather", "f32[8,32,64]{2,1,0}"),
                                      ("all-gather", "f32[64,512]{1,0}"),
                                      ("all-reduce", "(f32[], f32[64,512]{1,0})")]
  assert scaling.activation_gathers(hlo, {(64, 512)}) == ("f32[8,32,64]{2,1,0}",)


@functools.cache
def _one_device(program: str) -> scaling.Measurement:
  return scaling.measure(program, SETUP, scaling.mesh_of({}), repeats=0)


# Every training program on the mesh that splits its weights most; the others on one mesh each
# (each case compiles two programs: a minute of the suite's time together).
@pytest.mark.parametrize("program, mesh", [
    ("distill_online", dict(data=8)),
    ("distill_online", dict(fsdp=8)),
    ("distill_online", dict(data=4, tensor=2)),
    ("distill_offline", dict(data=4, tensor=2)),
    ("importance", dict(fsdp=8)),
    ("evaluate", dict(data=4, tensor=2)),
])
def test_no_program_gathers_activations_and_memory_splits(program, mesh):
  split = scaling.measure(program, SETUP, scaling.mesh_of(mesh), repeats=0)
  assert split.activation_gathers == (), split.collectives
  assert "collective-permute" not in split.collectives
  assert split.temp_bytes < 0.5 * _one_device(program).temp_bytes


def test_the_embedding_lookup_never_gathers_the_whole_table_on_fsdp():
  """FSDP splits the table's embed axis: the lookup gathers token ids, not the [vocab, hidden]
  table (1 GiB per device in float32 for a 128K vocabulary)."""
  import jax
  import jax.numpy as jnp

  from minitron_jax.models import model, partitioning, sharding

  mesh = scaling.mesh_of(dict(fsdp=8))
  shardings = sharding.param_shardings(TEACHER, mesh)
  params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        model.abstract_params(TEACHER), shardings)
  tokens = jax.ShapeDtypeStruct((8, 32), jnp.int32,
                                sharding=partitioning.batch_sharding(mesh, (8, 32)))
  with jax.set_mesh(mesh):
    hlo = jax.jit(lambda p, t: model.hidden_states(TEACHER, p, t)[0]).lower(
        params, tokens).compile().as_text()
  gathered = [shape for op, shape in scaling.collectives(hlo) if op == "all-gather"]
  table = f"[{TEACHER.vocab_size},{TEACHER.hidden_size}]"
  assert any(shape.startswith("s32") for shape in gathered), gathered  # the token ids
  assert not any(table in shape for shape in gathered), gathered
