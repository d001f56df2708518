"""Runs the configured stages in order; a stage whose output already exists is skipped.

  teacher_correction -> check -> [teacher_logits -> importance -> search -> prune -> distill]
  per compression stage -> evaluate -> report

`config.compression` lists the compression stages (target, teacher, distill steps); without it
there is one, with `config.prune.target`, working directly in the workdir. Stage k starts from
stage k-1's distilled student; its teacher is the original model or that previous student.

Nothing runs, and nothing is written, until `validate` finds every setting sound. Each stage is
the module `run/stages/<name>.py` of its registry entry; its outputs are staged and published
whole, its done marker last (`registry.staged`), so a run killed at any moment reruns from the
stage it was in. One run at a time holds the workdir (`workdir_lock`). With several processes
(see `distributed`) every process runs this same loop on a shared work directory; the primary
one writes the files.
"""

from __future__ import annotations

import json
import pathlib
import time

import jax
import ml_collections

from minitron_jax.core import atomic, distributed, workdir_lock
from minitron_jax.run import registry, stage_context, stages, validate
from minitron_jax.run.stage_context import Context, ModelRef


def run(cfg: ml_collections.ConfigDict, workdir: str | pathlib.Path, log=print) -> None:
  workdir = pathlib.Path(workdir).absolute()
  problems = validate.validate(cfg, workdir)
  if problems:
    raise validate.error(problems)
  # Creates the workdir; a second run on it (a requeued job while this one runs) is refused here.
  with workdir_lock.held(workdir):
    _run_holding(cfg, workdir, log)


def _run_holding(cfg: ml_collections.ConfigDict, workdir: pathlib.Path, log) -> None:
  timings_path = workdir / "timings.json"
  try:
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
  except ValueError:  # only a copy damaged outside this program; the times are not needed
    timings = {}

  def run_stage(name: str, ctx: Context, key: str) -> None:
    marker = registry.path(ctx.directory, name)
    done = marker.exists()
    # Every process looks before any may write the marker, so all decide alike.
    distributed.barrier(f"before {key}")
    if done:
      log(f"[{name}] skipped: {marker} exists")
      return
    started = time.perf_counter()
    with registry.staged(ctx.directory, name) as outputs:  # published whole, marker last
      stages.runner(name)(ctx, outputs)
    timings[key] = time.perf_counter() - started
    atomic.write_json(timings_path, timings)
    distributed.barrier(f"after {key}")

  # Every stage computes on the run's mesh; the model pins activations to its batch axes.
  mesh = stage_context.mesh_of(cfg)
  with jax.set_mesh(mesh):
    _run_stages(cfg, workdir, mesh, run_stage, log)


def _run_stages(cfg, workdir: pathlib.Path, mesh, run_stage, log) -> None:
  original = stage_context.original_ref(cfg, workdir)
  base = Context(cfg=cfg, directory=workdir, mesh=mesh, source=original, teacher=original,
                 log=log)
  for name in registry.BEFORE_COMPRESSION:
    if name in cfg.stages:
      run_stage(name, base if name == "check" else Context(cfg, workdir, mesh, log=log), name)

  previous = original
  for step in stage_context.compression_plan(cfg, workdir):
    ctx = Context(cfg=cfg, directory=step.directory, mesh=mesh, source=previous,
                  teacher=original if step.teacher == "original" else previous, step=step,
                  log=log)
    for name in registry.COMPRESSION_STAGES:
      if name in cfg.stages:
        run_stage(name, ctx, step.key(name))
    produced = "distill" if "distill" in cfg.stages else "prune"
    previous = ModelRef(registry.path(step.directory, produced, "model"),
                        f"{step.name or 'stage'} {produced}")

  for name in registry.AFTER_COMPRESSION:
    if name in cfg.stages:
      run_stage(name, base, name)
