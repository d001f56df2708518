r"""Per-device work: the same global batch through every program on 1 and on 8 simulated devices.

  python experiments/benchmarks/scaling.py                       # the issue-22 table (~15 min)
  python experiments/benchmarks/scaling.py --programs=distill_online --meshes=data8

On simulated CPU devices that share the machine's cores, a program whose devices each do only
their share takes about as long on 8 devices as on 1; one that repeats work on every device takes
up to 8x as long. Each row gives that ratio, the per-device compiled temporary memory, the
collectives in the compiled program and any all-gather of activations (a gathered shape that is
no weight's). Writes experiments/results/scaling.json and appends the table to BENCHMARKS.md.
"""

import json
import os
import pathlib
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()

from absl import app, flags  # noqa: E402

from minitron_jax.tools import benchmark, scaling  # noqa: E402

MESHES = {"data8": {"data": 8}, "fsdp8": {"fsdp": 8}, "data4_tensor2": {"data": 4, "tensor": 2},
          "data2_expert4": {"data": 2, "expert": 4}}
# MoE programs run on the expert mesh as well; dense ones have nothing to split over experts.
_PROGRAMS = flags.DEFINE_list("programs", list(scaling.PROGRAMS), "Programs to measure.")
_MESHES = flags.DEFINE_list("meshes", list(MESHES), "Meshes to compare with one device.")
_BATCH = flags.DEFINE_integer("batch", 16, "Global batch (sequences).")
_SEQ = flags.DEFINE_integer("seq", 512, "Tokens per sequence.")
_VOCAB = flags.DEFINE_integer("vocab", 32768, "Vocabulary.")
_HIDDEN = flags.DEFINE_integer("hidden", 256, "Teacher and student width.")
_LAYERS = flags.DEFINE_integer("layers", 2, "Teacher and student depth.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per program and mesh (median).")
_OUT = flags.DEFINE_string("out", "experiments/results/scaling.json", "JSON written here.")


def main(argv):
  del argv
  config = benchmark.model_config("tiny", _HIDDEN.value, _LAYERS.value, _VOCAB.value)
  setup = scaling.Setup(config, config.replace(intermediate_size=config.intermediate_size // 2),
                        _BATCH.value, _SEQ.value)
  results, rows = [], []
  for program in _PROGRAMS.value:
    one = scaling.measure(program, setup, scaling.mesh_of({}), _REPEATS.value)
    for mesh_name in _MESHES.value:
      if "expert" in mesh_name and program != "distill_moe":
        continue
      mesh = scaling.measure(program, setup, scaling.mesh_of(MESHES[mesh_name]), _REPEATS.value)
      ratio = mesh.seconds / one.seconds
      results.append(dict(program=program, mesh=mesh_name, one_device_s=one.seconds,
                          mesh_s=mesh.seconds, ratio=ratio, one_device_temp=one.temp_bytes,
                          mesh_temp=mesh.temp_bytes, collectives=mesh.collectives,
                          activation_gathers=list(mesh.activation_gathers)))
      rows.append((program, mesh_name, f"{one.seconds:.3f}", f"{mesh.seconds:.3f}",
                   f"{ratio:.2f}x", f"{one.temp_bytes / 2**20:.1f}",
                   f"{mesh.temp_bytes / 2**20:.1f}",
                   ", ".join(f"{op} {n}" for op, n in sorted(mesh.collectives.items())) or "-",
                   "; ".join(mesh.activation_gathers[:3]) or "none"))
      print(" | ".join(rows[-1]), flush=True)
  out = pathlib.Path(_OUT.value)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(dict(setup=dict(batch=_BATCH.value, seq=_SEQ.value,
                                            vocab=_VOCAB.value, hidden=_HIDDEN.value,
                                            layers=_LAYERS.value), rows=results), indent=1))
  print(benchmark.append_to_log(
      f"Per-device work, {_BATCH.value}x{_SEQ.value} tokens, vocab {_VOCAB.value}, "
      f"{_LAYERS.value}-layer hidden-{_HIDDEN.value} models, 1 vs 8 simulated CPU devices",
      ["program", "mesh", "1 device s", "8 devices s", "ratio", "1-device temp MiB",
       "per-device temp MiB", "collectives", "activation all-gathers"], rows,
      f"`python {' '.join(sys.argv)}`; targets: ratio <= 1.3x under pure data parallelism, "
      "<= 1.5x where the mesh also splits weights, no activation all-gather in training."))


if __name__ == "__main__":
  app.run(main)
