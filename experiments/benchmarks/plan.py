r"""Memory plan of a run's config on a mesh it need not have: per-device bytes of every program.

  python experiments/benchmarks/plan.py --config=configs/llama3_1_8b_to_4b.py \
      --mesh=data=1,fsdp=8,tensor=1 --hbm_gib=72
  python experiments/benchmarks/plan.py --config=configs/nemotron4_15b_to_4b.py --stage=1 \
      --mesh=data=1,fsdp=32,tensor=1 --hbm_gib=95 --json

Each program the config runs (teacher correction, importance, drop-loss, distillation) is
compiled at full size from abstract shapes on as many simulated CPU devices as the mesh has;
nothing of the model's size is allocated. Parameters and optimizer state are exact per-device
shard bytes; the compiled figures (and the largest per-device batch that fits --hbm_gib, found
by compiling) are the CPU compiler's estimate of a GPU/TPU build. See minitron_jax/tools/memory_plan.py.
Config overrides work as in the main job: --config.distill.remat=full,
--config.model.attention=naive.
"""

import dataclasses
import datetime
import json
import math
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from minitron_jax.errors import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml-collections config file.")
_MESH = flags.DEFINE_string("mesh", "data=1,fsdp=8,tensor=1",
                            "Mesh sizes; their product is the number of simulated devices.")
_HBM = flags.DEFINE_float("hbm_gib", 80.0, "Memory per device the max-batch search fits, GiB.")
_SEQ = flags.DEFINE_integer("seq_len", None, "Sequence length of every program (default: the "
                            "config's).")
_BATCH = flags.DEFINE_integer("batch", None, "Per-device (micro-)batch to plan at (default: the "
                              "config's global batch).")
_STAGE = flags.DEFINE_integer("stage", 0, "Compression stage (0-based) of a multi-stage config.")
_PROGRAMS = flags.DEFINE_list("programs", None, "Programs to plan (default: all the config runs).")
_SEARCH = flags.DEFINE_bool("search", True, "Search the largest per-device batch that fits.")
_LIMIT = flags.DEFINE_integer("limit", 256, "Largest per-device batch the search tries.")
_JSON = flags.DEFINE_bool("json", False, "Print JSON (bytes) instead of a table.")
_UNIT = flags.DEFINE_enum("unit", "GiB", ["GiB", "MiB"], "Unit of the table.")
flags.mark_flags_as_required(["config"])

CAVEAT = ("parameters and optimizer: exact per-device shard bytes; argument/output/temp/peak and "
          "max batch: XLA CPU compiler's memory analysis of the SPMD program, an estimate of "
          "GPU/TPU memory (their compilers fuse, schedule and pick attention kernels differently)")


def parse_mesh(text: str) -> dict[str, int]:
  """'data=1,fsdp=8,tensor=1' -> sizes; every axis explicit, since the devices are simulated."""
  sizes = dict(data=1, fsdp=1, tensor=1, expert=1)
  for part in filter(None, text.split(",")):
    name, _, value = part.partition("=")
    if name.strip() not in sizes or not value.strip().isdigit() or int(value) < 1:
      raise ConfigError(f"mesh entry {part!r} is invalid; allowed: data=N,fsdp=N,tensor=N with "
                        "positive N")
    sizes[name.strip()] = int(value)
  return sizes


def _size(n: float) -> str:
  return f"{n / 2**(30 if _UNIT.value == 'GiB' else 20):,.2f}"


def table(plans, searches, hbm_bytes: int) -> str:
  header = ["program", "global batch", "per-device batch", "seq", "teacher params", "params",
            "optimizer", "argument", "output", "donated (alias)", "temp", "generated code",
            "peak", f"fits {hbm_bytes / 2**30:g} GiB", "max per-device batch (global)",
            "compile s"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for plan in plans:
    found = searches.get(plan.program)
    best = ("" if found is None else "none: 1 does not fit" if not found.per_device_batch else
            f"{'>=' if found.capped else ''}{found.per_device_batch} ({found.global_batch:,})")
    m, s = plan.memory, plan.state
    cells = [plan.program, f"{plan.global_batch:,}", f"{plan.per_device_batch:g}",
             str(plan.seq_len), _size(s.teacher_params), _size(s.params),
             _size(s.optimizer), _size(m.argument), _size(m.output), _size(m.alias), _size(m.temp),
             _size(m.generated_code), _size(m.peak), "yes" if m.peak <= hbm_bytes else "no", best,
             f"{plan.compile_seconds:.1f}"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  try:
    mesh_sizes = parse_mesh(_MESH.value)
  except ConfigError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  devices = math.prod(mesh_sizes.values())
  # Backends start at the first device query, so these still apply although jax is imported:
  # the plan is for CPU devices even on a machine with an accelerator.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={devices}").strip()
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax  # noqa: E402  (after the device count is set)

  from minitron_jax.models import partitioning
  from minitron_jax.tools import memory_plan

  if jax.device_count() != devices:
    print(f"error: {jax.device_count()} devices started, the mesh needs {devices}; run the plan "
          "in a fresh process", file=sys.stderr)
    sys.exit(2)
  cfg = _CONFIG.value
  log = (lambda message: None) if _JSON.value else (lambda message: print(message, flush=True))
  try:
    if _SEQ.value is not None:
      cfg.distill.seq_len = cfg.importance.seq_len = _SEQ.value
    mesh = partitioning.make_mesh(partitioning.MeshConfig(**mesh_sizes))
    names = tuple(_PROGRAMS.value or memory_plan.PROGRAMS)
    programs = memory_plan.programs(cfg, mesh, _STAGE.value, names)
    hbm = int(_HBM.value * 2**30)
    plans, searches = [], {}
    for program in programs:
      batch = _BATCH.value * program.batch_multiple if _BATCH.value else None
      plans.append(memory_plan.measure(program, batch))
      log(f"[plan] {program.name}: compiled at global batch {plans[-1].global_batch:,} in "
          f"{plans[-1].compile_seconds:.1f}s")
      if _SEARCH.value:
        searches[program.name] = memory_plan.max_batch(program, hbm, _LIMIT.value, log=log)
  except ConfigError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  if _JSON.value:
    print(json.dumps(dict(
        mesh=mesh_sizes, devices=devices, hbm_bytes=hbm, stage=_STAGE.value, caveat=CAVEAT,
        plans=[dict(dataclasses.asdict(p), peak=p.memory.peak) for p in plans],
        max_batch={k: dataclasses.asdict(v) for k, v in searches.items()}), indent=2))
    return
  print(f"\nMemory plan, {_UNIT.value} per device: mesh {mesh_sizes} ({devices} simulated "
        f"CPU devices), stage {_STAGE.value}, {datetime.date.today().isoformat()}, "
        f"jax {jax.__version__}")
  print(table(plans, searches, hbm))
  print(f"\npeak = argument + output - donated + temp. {CAVEAT}.")


if __name__ == "__main__":
  app.run(main)
