"""Does every device do only its share? The same global batch through each jitted program on one
device and on a mesh, compared by time, per-device compiled temporary memory and the collectives
in the compiled program.

Equal results on 1 and 8 devices prove nothing about scaling: a program that computes everything
everywhere gives them too. On simulated CPU devices that share the same cores, replicated work
shows as time (8 devices doing all the work take 8x as long), and in the program as all-gathers
of activations. `measure` runs one program on one mesh; experiments/benchmarks/scaling.py runs
the table, and tests/test_scaling.py the small check.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Callable

import jax
import numpy as np

from minitron_jax.compress import importance
from minitron_jax.models import model, partitioning, sharding
from minitron_jax.objectives import sparse_kld
from minitron_jax.training import distill, teacher_logits_store
from minitron_jax.models.config import ModelConfig
from minitron_jax.objectives.losses import LossConfig

PROGRAMS = ("distill_online", "distill_offline", "distill_moe", "importance", "evaluate",
            "teacher_store")
_COLLECTIVE = re.compile(r"= (\(?[^=]*?\)?) (all-gather|all-reduce|reduce-scatter|all-to-all|"
                         r"ragged-all-to-all|collective-permute)(?:-start)?\(")
_SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")


@dataclasses.dataclass(frozen=True)
class Setup:
  """The models and global batch every program of one comparison runs."""

  teacher: ModelConfig
  student: ModelConfig
  batch: int
  seq: int
  top_k: int = 128


@dataclasses.dataclass(frozen=True)
class Measurement:
  seconds: float  # median wall time of a call, compilation excluded
  temp_bytes: int  # the compiled program's temporary buffers, per device
  collectives: dict[str, int]  # op -> how many the compiled program holds
  activation_gathers: tuple[str, ...]  # all-gathered shapes that are no weight's


def collectives(hlo: str) -> list[tuple[str, str]]:
  """(op, result shape text) of every collective in a compiled program's text."""
  return [(m.group(2), m.group(1)) for m in _COLLECTIVE.finditer(hlo)]


def weight_shapes(*param_trees) -> set[tuple[int, ...]]:
  """Shapes a gathered weight may have: each leaf, a layer's slice of a stacked leaf, and their
  transposes (a tied embedding used as the head)."""
  shapes = set()
  for leaf in jax.tree.leaves(param_trees):
    for shape in (tuple(leaf.shape), tuple(leaf.shape[1:])):
      shapes.update({shape, shape[::-1]})
  return shapes


def activation_gathers(hlo: str, weights: set[tuple[int, ...]]) -> tuple[str, ...]:
  """All-gathers in the program with a floating result that is no weight's shape nor a slice of
  one (a mesh axis that does not take part in a gather may still split a weight's other dims).
  Integer gathers are token ids (4 bytes a token, against hidden x 4 for an activation): the
  embedding lookup gathers them rather than the whole table, which FSDP splits."""
  def weight_like(shape):
    return any(len(w) == len(shape) and all(n and m % n == 0 for n, m in zip(shape, w))
               for w in weights)

  found = []
  for op, text in collectives(hlo):
    if op != "all-gather":
      continue
    typed = _SHAPE.findall(text)
    if all(kind.startswith(("s", "u")) for kind, _ in typed):  # s32 / u32: token ids
      continue
    shapes = [tuple(int(d) for d in dims.split(",") if d) for _, dims in typed]
    if not all(weight_like(shape) for shape in shapes):
      found.append(text)
  return tuple(found)


def _batch(setup: Setup, seed: int = 0) -> dict[str, np.ndarray]:
  """Two packed documents per row and a padded tail, as the data pipeline makes them."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, setup.teacher.vocab_size, (setup.batch, setup.seq), dtype=np.int32)
  half = setup.seq // 2
  segment_ids = np.ones_like(tokens)
  segment_ids[:, half:] = 2
  segment_ids[:, setup.seq - setup.seq // 8:] = 0
  positions = np.concatenate([np.arange(half), np.arange(setup.seq - half)]).astype(np.int32)
  return dict(tokens=tokens, segment_ids=segment_ids,
              positions=np.broadcast_to(positions, tokens.shape).copy())


def _moe(config: ModelConfig) -> ModelConfig:
  """A mixture of experts with the dense model's width and depth: 8 experts, 2 per token."""
  return config.replace(family="qwen3_moe", num_experts=8, num_experts_per_tok=2,
                        moe_intermediate_size=config.intermediate_size // 2, qk_norm=True,
                        norm_topk_prob=True)


@dataclasses.dataclass(frozen=True)
class Program:
  """One jitted program with its placed arguments: `call` runs it once, `lower` lowers it."""

  call: Callable[[], object]
  lower: Callable[[], object]
  weights: tuple  # the param trees whose shapes may be all-gathered


def build(program: str, setup: Setup, mesh) -> Program:
  """One program of PROGRAMS with its arguments placed on `mesh` as training places them."""
  teacher_cfg, student_cfg = setup.teacher, setup.student
  if program == "distill_moe":
    teacher_cfg, student_cfg = _moe(teacher_cfg), _moe(student_cfg)
  teacher = sharding.shard_params(teacher_cfg, model.init(teacher_cfg, 0), mesh)
  host_batch = _batch(setup)
  place = lambda b: {k: jax.device_put(v, partitioning.batch_sharding(mesh, v.shape))  # noqa: E731
                     for k, v in b.items()}
  if program in ("distill_online", "distill_offline", "distill_moe"):
    offline = program == "distill_offline"
    distiller = distill.Distiller(student_cfg, None if offline else teacher_cfg, LossConfig(),
                                  distill.OptimizerConfig(), 10, offline_teacher=offline)
    student = sharding.shard_params(student_cfg, model.init(student_cfg, 1), mesh)
    if offline:
      outputs = teacher_logits_store.teacher_outputs(teacher_cfg, teacher, host_batch, setup.top_k, 1.0)
      host_batch = dict(host_batch, **{name: np.asarray(x) for name, x in zip(
          ("teacher_log_probs", "teacher_indices", "teacher_tail"), outputs)})
    batch = place(host_batch)
    holder = {"state": distiller.init_state(student)}  # donated: each call threads it on

    def call():
      holder["state"], metrics = distiller.train_step(holder["state"], teacher, batch)
      return metrics["loss"]

    return Program(call, lambda: distiller.train_step.lower(holder["state"], teacher, batch),
                   (teacher, student))
  batch = place(host_batch)
  args = (teacher, batch["tokens"], batch["segment_ids"], batch["positions"])
  if program == "importance":
    fn = jax.jit(lambda p, *a: importance._batch_statistics(teacher_cfg, p, *a, block_sizes=(1,)))
  elif program == "evaluate":
    fn = jax.jit(lambda p, *a: importance._lm_loss_sums(teacher_cfg, p, *a))
  elif program == "teacher_store":
    fn = jax.jit(lambda p, *a: sparse_kld.teacher_top_k(
        model.apply(teacher_cfg, p, a[0], segment_ids=a[1], positions=a[2]), setup.top_k))
  else:
    raise ValueError(f"program {program!r} is unknown; allowed: {', '.join(PROGRAMS)}")
  return Program(lambda: fn(*args), lambda: fn.lower(*args), (teacher,))


def measure(program: str, setup: Setup, mesh, repeats: int = 3) -> Measurement:
  """One program on one mesh (set as the mesh in context, as the pipeline runs it); repeats=0
  compiles only (seconds is then nan)."""
  with jax.set_mesh(mesh):
    built = build(program, setup, mesh)
    compiled = built.lower().compile()
    hlo = compiled.as_text()
    memory = compiled.memory_analysis()
    times = []
    if repeats:
      jax.block_until_ready(built.call())  # the first call compiles
    for _ in range(repeats):
      started = time.perf_counter()
      jax.block_until_ready(built.call())
      times.append(time.perf_counter() - started)
  counts: dict[str, int] = {}
  for op, _ in collectives(hlo):
    counts[op] = counts.get(op, 0) + 1
  return Measurement(float(np.median(times)) if times else float("nan"),
                     int(getattr(memory, "temp_size_in_bytes", 0)), counts,
                     activation_gathers(hlo, weight_shapes(*built.weights)))


def mesh_of(sizes: dict[str, int], devices=None):
  """A mesh of the given axis sizes (others 1) on the first prod(sizes) devices."""
  config = partitioning.MeshConfig(**{"data": 1, **sizes})
  count = int(np.prod(list(sizes.values()) or [1]))
  return partitioning.make_mesh(config, (devices or jax.devices())[:count])
