"""Runs the configured stages in order; a stage whose output already exists is skipped."""

from __future__ import annotations

import pathlib
from typing import Callable

import ml_collections

from minitron_jax import check, stages
from minitron_jax.config import ConfigError

# stage name -> (function(config, workdir) -> metrics, file whose presence marks it done)
STAGES: dict[str, tuple[Callable, str]] = {
    "check": (check.run, "check/metrics.json"),
    "importance": (stages.run_importance, "importance/summary.json"),
    "prune": (stages.run_prune, "prune/summary.json"),
    "distill": (stages.run_distill, "distill/summary.json"),
}


def run(cfg: ml_collections.ConfigDict, workdir: str | pathlib.Path, log=print) -> None:
  workdir = pathlib.Path(workdir)
  unknown = [s for s in cfg.stages if s not in STAGES]
  if unknown:
    raise ConfigError(f"stages {unknown} are unknown; allowed: {sorted(STAGES)}")
  workdir.mkdir(parents=True, exist_ok=True)
  for name in cfg.stages:
    function, marker = STAGES[name]
    if (workdir / marker).exists():
      log(f"[{name}] skipped: {workdir / marker} exists")
      continue
    function(cfg, workdir, log=log)
