r"""Each process's peak host memory (VmHWM) while the main job reads, scores, searches and prunes
a Llama-3.2-1B-shaped model saved as a bfloat16 Hugging Face directory, on 1 process x 8 CPU
devices and on 2 processes x 4 (fsdp=8), and the load times of the old and new reads.

  python experiments/benchmarks/host_memory.py              # both layouts (~15 min, 5 GB disk)
  python experiments/benchmarks/host_memory.py --layouts=2x4

Steps, each a fresh set of processes (minitron_jax/tools/host_memory.py says how it measures):
  hf_load   the old read: every tensor into host numpy in float32 (hf.load), then placed
  sliced    the read by slices into the shards (hf_slices.load), float32 on the devices
  importance, search, prune   the main job's stages, one run each; importance is the first stage
            that needs the model, so it converts it once into workdir/original (bfloat16, sharded)
  restore   the restore of that copy onto the mesh (what every later stage does)
Each step also runs on a model of the same vocabulary and depth but ~100x narrower: its peak is
the step's allowance (jax, compilations, the data pipeline, logits), and the target is a peak at
most 0.6 x the model's float32 bytes above it. Writes experiments/results/host_memory.json and
appends the table to BENCHMARKS.md.
"""

import json
import pathlib
import shutil
import sys
import time

from absl import app, flags

from minitron_jax.tools import host_memory

_LAYOUTS = flags.DEFINE_list("layouts", ["1x8", "2x4"], "processes x devices per process.")
_DIR = flags.DEFINE_string("dir", "/tmp/minitron_host_memory", "Checkpoints and work dirs.")
_OUT = flags.DEFINE_string("out", "experiments/results/host_memory.json", "JSON written here.")
_SIZES = flags.DEFINE_list("sizes", ["full", "narrow"], "Models to measure (both for the "
                           "table).")
_STEPS = flags.DEFINE_list("steps", [], "Only these steps (a check of the set-up; no table).")
_LOG = flags.DEFINE_bool("log", True, "Append the table to BENCHMARKS.md.")
# One step, run by the orchestrating process in fresh processes:
_MAKE = flags.DEFINE_string("make", "", "Write the model of this size ('full' or 'narrow') to "
                            "--checkpoint and exit.")
_PROBE = flags.DEFINE_enum("probe", None, host_memory.LOADS, "Time one read and exit.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "", "The checkpoint a step reads.")
_COPY = flags.DEFINE_string("copy", "", "The converted copy `--probe=restore` restores.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "Processes.")
flags.DEFINE_integer("process_id", None, "This process's index.")

# The narrow model: Llama-3.2-1B's vocabulary, depth and head counts, 1/32 of its widths.
SIZES = {"full": dict(hidden=2048, head_dim=64, ffn=8192),
         "narrow": dict(hidden=64, head_dim=8, ffn=256)}


def _model_config(size: str):
  from minitron_jax.models import config as config_lib

  widths = SIZES[size]
  return config_lib.preset("llama3_2_1b", hidden_size=widths["hidden"],
                           head_dim=widths["head_dim"], intermediate_size=widths["ffn"])


def _make(size: str, path: pathlib.Path) -> None:
  from minitron_jax.checkpoints import hf
  from minitron_jax.models import model

  config = _model_config(size)
  hf.save(path, config, model.init(config, 0), dtype="bfloat16")


def _probe(which: str, checkpoint: str, copy: str) -> None:
  import jax

  from minitron_jax.checkpoints import checkpoint as saved, hf, hf_slices
  from minitron_jax.core import distributed
  from minitron_jax.models import partitioning, sharding

  distributed.initialize(flags.FLAGS.coordinator_address, flags.FLAGS.num_processes,
                         flags.FLAGS.process_id)
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=1, fsdp=jax.device_count()))
  started = time.perf_counter()
  if which == "hf_load":
    config, params = hf.load(checkpoint)
    params = sharding.shard_params(config, params, mesh)
  elif which == "sliced":
    config = hf.load_config(checkpoint)
    _, params = hf_slices.load(checkpoint, sharding.param_shardings(config, mesh))
  else:
    config = saved.load_config(copy)
    _, params = saved.load_model(copy, sharding.param_shardings(config, mesh))
  jax.block_until_ready(params)
  print(json.dumps({"seconds": time.perf_counter() - started}))


def _stage_settings(checkpoint: pathlib.Path, size: str, stage: str) -> dict:
  hidden, ffn = SIZES[size]["hidden"], SIZES[size]["ffn"]
  narrowed = lambda fraction, of: int(of * fraction)  # noqa: E731
  # Both candidates within the budget's tolerance: the search prunes and scores each.
  sizes = [_model_config(size).replace(hidden_size=narrowed(f, hidden),
                                       intermediate_size=narrowed(0.75, ffn)).num_params()
           for f in (0.5, 0.75)]
  return {
      "stages": (stage,), "model.hf_path": str(checkpoint), "tokenizer": "bytes",
      "mesh.data": 1, "mesh.fsdp": 8, "eval_batches": 1,
      "data.batch_size": 8, "data.seq_len": 128,
      "importance.num_samples": 8, "importance.batch_size": 8, "importance.seq_len": 128,
      "importance.drop_loss": False, "importance.block_sizes": (1,),
      **{f"prune.target.{key}": value for key, value in dict(
          num_layers=16, hidden_size=narrowed(0.75, hidden), num_attention_heads=32,
          num_key_value_heads=8, intermediate_size=narrowed(0.75, ffn)).items()},
      # Model Optimizer's way: each candidate pruned on the mesh and scored by a task, as it is.
      **{f"search.space.{key}": value for key, value in dict(
          num_layers=(16,), hidden_size=(narrowed(0.5, hidden), narrowed(0.75, hidden)),
          num_attention_heads=(32,), num_key_value_heads=(8,),
          intermediate_size=(narrowed(0.75, ffn),), mlp_expansion=(), budget=sum(sizes) // 2,
          tolerance=0.5).items()},
      "search.score": "lm_eval:next_line", "search.score_at": "pruned",
      "evaluate.tasks.next_line.num_examples": 8, "evaluate.batch_size": 8,
      "export_dtype": "bfloat16",
  }


def _steps():
  """(name, command builder(checkpoint, size, workdir)) in the order they must run."""
  script = [sys.executable, "-u", str(pathlib.Path(__file__).resolve())]

  def probe(which):
    return lambda checkpoint, size, workdir: [*script, f"--probe={which}",
                                              f"--checkpoint={checkpoint}",
                                              f"--copy={workdir / 'original'}"]

  def stage(name):
    return lambda checkpoint, size, workdir: host_memory.main_job(
        "configs/default.py", workdir, _stage_settings(checkpoint, size, name))

  return [("hf_load", probe("hf_load")), ("sliced", probe("sliced")),
          ("importance", stage("importance")), ("search", stage("search")),
          ("prune", stage("prune")), ("restore", probe("restore"))]


def _seconds(measured) -> float | None:
  for line in reversed(measured.tail.splitlines()):
    if line.startswith("{"):
      return json.loads(line)["seconds"]
  return None


def main(argv):
  del argv
  if _MAKE.value:
    return _make(_MAKE.value, pathlib.Path(_CHECKPOINT.value))
  if _PROBE.value:
    return _probe(_PROBE.value, _CHECKPOINT.value, _COPY.value)
  root = pathlib.Path(_DIR.value)
  single = host_memory.Layout(1, 1)
  checkpoints = {}
  for size in _SIZES.value:
    checkpoints[size] = root / f"llama3_2_1b_{size}_bf16"
    if not (checkpoints[size] / "config.json").exists():
      print(f"writing the {size} checkpoint to {checkpoints[size]}", flush=True)
      host_memory.launch([sys.executable, __file__, f"--make={size}",
                          f"--checkpoint={checkpoints[size]}"], single)
  steps = [(name, command) for name, command in _steps()
           if not _STEPS.value or name in _STEPS.value]
  model_bytes = _model_config("full").num_params() * 4
  results = {"model_float32_bytes": model_bytes, "layouts": {}}
  rows = []
  for layout in map(host_memory.Layout.parse, _LAYOUTS.value):
    measured = {}
    for size in _SIZES.value:
      workdir = root / f"work_{layout.name}_{size}"
      if not _STEPS.value:
        shutil.rmtree(workdir, ignore_errors=True)
      for name, command in steps:
        step = host_memory.launch(command(checkpoints[size], size, workdir), layout)
        measured[(name, size)] = step
        print(f"{layout.name} {size} {name}: peaks {[host_memory.gib(p) for p in step.peaks]} "
              f"GiB, {step.seconds:.0f}s, load {_seconds(step)}", flush=True)
    if _STEPS.value or len(_SIZES.value) < len(SIZES):
      continue  # a check of the set-up: no table
    entry = {}
    for name, _ in _steps():
      full, narrow = measured[(name, "full")], measured[(name, "narrow")]
      above = [p - a for p, a in zip(full.peaks, narrow.peaks)]
      ok = all(host_memory.within_target(p, a, model_bytes)
               for p, a in zip(full.peaks, narrow.peaks))
      load = _seconds(full)
      entry[name] = dict(peaks=full.peaks, allowances=narrow.peaks, seconds=full.seconds,
                         load_seconds=load, within_target=ok)
      rows.append([layout.name, name, " / ".join(host_memory.gib(p) for p in full.peaks),
                   " / ".join(host_memory.gib(p) for p in narrow.peaks),
                   " / ".join(f"{p / model_bytes:.2f}" for p in above),
                   "yes" if ok else "NO", f"{full.seconds:.0f}",
                   "" if load is None else f"{load:.1f}"])
    speedup = entry["hf_load"]["load_seconds"] / entry["restore"]["load_seconds"]
    entry["restore_speedup_over_hf_load"] = speedup
    results["layouts"][layout.name] = entry
    print(f"{layout.name}: restoring the copy is {speedup:.1f}x faster than hf.load", flush=True)
  if not rows:
    return
  host_memory.write_json(pathlib.Path(_OUT.value), results)
  header = ["processes x devices", "step", "peak RSS per process (GiB)",
            "allowance (narrow model, GiB)", "above allowance / f32 model", "<= 0.6x",
            "step wall (s)", "load (s)"]
  notes = (f"Llama-3.2-1B shapes, random weights, saved as bfloat16 safetensors "
           f"({model_bytes / host_memory.GIB:.2f} GiB in float32); mesh fsdp=8; search: 2 "
           "candidates pruned on the mesh and scored by lm_eval next_line as pruned. "
           + "; ".join(f"{name}: restore {entry['restore_speedup_over_hf_load']:.1f}x faster "
                       "than hf.load" for name, entry in results["layouts"].items()))
  table = "\n".join(" | ".join(map(str, row)) for row in rows)
  print(table)
  if _LOG.value:
    from minitron_jax.tools import benchmark

    print(benchmark.append_to_log("Host memory per process (issue 31)", header, rows, notes))


if __name__ == "__main__":
  app.run(main)
