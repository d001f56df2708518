"""Runs the configured stages in order; a stage whose output already exists is skipped.

  teacher_correction -> check -> [teacher_logits -> importance -> search -> prune -> distill]
  per compression stage -> evaluate -> report

`config.compression` lists the compression stages (target, teacher, distill steps); without it
there is one, with `config.prune.target`, working directly in the workdir. Stage k starts from
stage k-1's distilled student; its teacher is the original model or that previous student.

Nothing runs, and nothing is written, until `validate` finds every setting sound. Each stage's
output appears whole or not at all (`atomic`), so a run killed at any moment reruns from the
stage it was in. One run at a time holds the workdir (`workdir_lock`). With several processes
(see `distributed`) every process runs this same loop on a shared work directory; the primary
one writes the files.
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Callable

import jax
import ml_collections

from minitron_jax.core import atomic, distributed
from minitron_jax.run import (check, evaluate_stage, report, stages, teacher_logits, validate,
                              workdir_lock)
from minitron_jax.run.stages import Context, ModelRef

# stage name -> (function(Context) -> summary, file whose presence marks it done)
STAGES: dict[str, tuple[Callable, str]] = {
    "teacher_correction": (stages.run_teacher_correction, "teacher_correction/summary.json"),
    "check": (check.run, "check/metrics.json"),
    "teacher_logits": (teacher_logits.run, "teacher_logits/summary.json"),
    "importance": (stages.run_importance, "importance/summary.json"),
    "search": (stages.run_search, "search/result.json"),
    "prune": (stages.run_prune, "prune/summary.json"),
    "distill": (stages.run_distill, "distill/summary.json"),
    "evaluate": (evaluate_stage.run_evaluate, "evaluate/metrics.json"),
    "report": (report.run_report, "report.md"),
}
PER_COMPRESSION = ("teacher_logits", "importance", "search", "prune", "distill")


def run(cfg: ml_collections.ConfigDict, workdir: str | pathlib.Path, log=print) -> None:
  workdir = pathlib.Path(workdir).absolute()
  unknown = [s for s in cfg.stages if s not in STAGES]
  problems = [f"stages {unknown} are unknown; allowed: {list(STAGES)}"] if unknown else []
  problems += validate.validate(cfg, workdir)
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
    function, marker = STAGES[name]
    done = (ctx.directory / marker).exists()
    # Every process looks before any may write the marker, so all decide alike.
    distributed.barrier(f"before {key}")
    if done:
      log(f"[{name}] skipped: {ctx.directory / marker} exists")
      return
    started = time.perf_counter()
    function(ctx)
    timings[key] = time.perf_counter() - started
    atomic.write_json(timings_path, timings)
    distributed.barrier(f"after {key}")

  # Every stage computes on the run's mesh; the model pins activations to its batch axes.
  with jax.set_mesh(stages.mesh_of(cfg)):
    _run_stages(cfg, workdir, run_stage, log)


def _run_stages(cfg, workdir: pathlib.Path, run_stage, log) -> None:
  original = stages.original_ref(cfg, workdir)
  base = Context(cfg=cfg, directory=workdir, source=original, teacher=original, log=log)
  for name in ("teacher_correction", "check"):
    if name in cfg.stages:
      run_stage(name, base if name == "check" else Context(cfg=cfg, directory=workdir, log=log),
                name)

  previous = original
  for step in stages.compression_plan(cfg, workdir):
    ctx = Context(cfg=cfg, directory=step["directory"], source=previous,
                  teacher=original if step["teacher"] == "original" else previous,
                  target=step["target"], distill_steps=step["distill_steps"], log=log)
    for name in PER_COMPRESSION:
      if name in cfg.stages:
        run_stage(name, ctx, f"{step['name']}/{name}" if step["name"] else name)
    produced = "distill" if "distill" in cfg.stages else "prune"
    previous = ModelRef(step["directory"] / produced / "model",
                        f"{step['name'] or 'stage'} {produced}")

  for name in ("evaluate", "report"):
    if name in cfg.stages:
      run_stage(name, base, name)
