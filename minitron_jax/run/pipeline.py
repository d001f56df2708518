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

import dataclasses
import json
import pathlib
import time

import jax
import ml_collections

from minitron_jax.core import atomic, distributed, workdir_lock
from minitron_jax.models import partitioning
from minitron_jax.run import problems as problems_lib, registry, stages, validate
from minitron_jax.run.stage_context import Context, Plan


def run(cfg: ml_collections.ConfigDict, workdir: str | pathlib.Path, log=print) -> None:
  plan, problems = validate.checked_plan(cfg, workdir)
  if problems:
    raise problems_lib.error(problems)
  # Creates the workdir; a second run on it (a requeued job while this one runs) is refused here.
  with workdir_lock.held(plan.workdir):
    _run_holding(plan, log)


def _run_holding(plan: Plan, log) -> None:
  timings_path = plan.workdir / "timings.json"
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
      stages.runner(name)(dataclasses.replace(ctx, stage=name), outputs)
    timings[key] = time.perf_counter() - started
    atomic.write_json(timings_path, timings)
    distributed.barrier(f"after {key}")

  # Every stage computes on the run's mesh; the model pins activations to its batch axes.
  mesh = partitioning.make_mesh(plan.mesh)
  with jax.set_mesh(mesh):
    _run_stages(plan, mesh, run_stage, log)


def _run_stages(plan: Plan, mesh, run_stage, log) -> None:
  original = plan.original
  base = Context(plan=plan, stage="", directory=plan.workdir, mesh=mesh, source=original,
                 teacher=original, log=log)
  for name in registry.BEFORE_COMPRESSION:
    if plan.runs(name):
      run_stage(name, base if name == "check" else Context(plan, "", plan.workdir, mesh, log=log),
                name)

  previous = original
  for step in plan.compression:
    ctx = Context(plan=plan, stage="", directory=step.directory, mesh=mesh, source=previous,
                  teacher=original if step.teacher == "original" else previous, step=step,
                  log=log)
    for name in registry.COMPRESSION_STAGES:
      if plan.runs(name):
        run_stage(name, ctx, step.key(name))
    previous = plan.produced(step)

  for name in registry.AFTER_COMPRESSION:
    if plan.runs(name):
      run_stage(name, base, name)
