"""The `evaluate` and `report` stages: every model the run produced, scored the same way, and one
markdown page that says what the compression achieved and what each stage cost."""

from __future__ import annotations

import functools
import inspect
import json
import pathlib
from typing import Any, Mapping

import jax
import ml_collections

from minitron_jax import (atomic, checkpoint, distributed, evaluate, report_curves, sharding,
                          stdlib_tasks, stages)
from minitron_jax.config import ConfigError
from minitron_jax.stages import Context

STDLIB_TASK = "stdlib_next_line"


def _task_loader(spec: Mapping[str, Any]):
  """(loader, its argument check, the arguments it takes, a ConfigError for those it does not
  or None) of one `evaluate.tasks` entry. The loader itself would fail on an unknown argument
  with a TypeError, so they are found here."""
  spec = dict(spec)
  source = spec.pop("source", None)
  if not source:
    raise ConfigError(f"source={source!r} is missing; allowed: {STDLIB_TASK!r}, a JSONL file or "
                      "tfds:NAME")
  if source == STDLIB_TASK:
    loader, check = stdlib_tasks.next_line_task, stdlib_tasks.check_arguments
  else:
    loader = functools.partial(evaluate.load_task, source)
    check = functools.partial(evaluate.check_task, source)
  allowed = [name for name, parameter in inspect.signature(loader).parameters.items()
             if parameter.kind is not inspect.Parameter.VAR_KEYWORD]
  unknown = sorted(set(spec) - set(allowed))
  refused = None if not unknown else ConfigError(
      f"arguments {unknown} do not apply to source={source!r}; allowed: {['source'] + allowed}")
  return loader, check, {k: v for k, v in spec.items() if k in allowed}, refused


def check_tasks(section: ml_collections.ConfigDict) -> list[str]:
  """One line per task that `load_tasks` would refuse (all its problems), reading no example."""
  problems = []
  for name, spec in section.tasks.items():
    found = []
    try:
      _, check, arguments, refused = _task_loader(spec)
      if refused is not None:
        found.append(str(refused))
      check(**arguments)
    except ConfigError as e:
      found.insert(0, str(e))  # the source itself first: it decides which arguments apply
    if found:
      problems.append(f"evaluate.tasks.{name}: " + "; also ".join(found))
  return problems


def load_tasks(section: ml_collections.ConfigDict) -> dict[str, list]:
  """name -> examples, from `evaluate.tasks` (the embedded stdlib task or local/TFDS files)."""
  tasks = {}
  for name, spec in section.tasks.items():
    loader, _, arguments, refused = _task_loader(spec)
    if refused is not None:
      raise refused
    tasks[name] = loader(**arguments)
  return tasks


def run_evaluate(ctx: Context) -> dict:
  cfg, out = ctx.cfg, ctx.directory / "evaluate"
  mesh = stages.mesh_of(cfg)
  tasks = load_tasks(cfg.evaluate)
  results = {}
  for label, ref in stages.models_of(cfg, ctx.directory).items():
    if ref.path is not None and not checkpoint.is_saved_model(ref.path):
      continue
    config, params = stages.load(cfg, ref, mesh)
    tok = stages.load_tokenizer(cfg, config.vocab_size)
    # On the mesh, params where training put them: no device holds the whole model.
    metrics = evaluate.evaluate_model(
        config, params, tok, tasks=tasks,
        perplexity_batches=stages.validation(cfg, config.vocab_size),
        batch_size=cfg.evaluate.batch_size, max_length=cfg.evaluate.max_length,
        place=lambda x: distributed.put(x, sharding.batch_sharding(mesh, x.shape)))
    results[label] = {"params": config.num_params(), **metrics}
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
    ctx.log(f"[evaluate] {label}: {shown}")
  if not results:
    raise ConfigError("no model to evaluate")
  with atomic.directory(out) as staging:
    atomic.write_text(staging / "table.md", evaluate.markdown_table(results))
    atomic.write_json(staging / "metrics.json", results)
  return results


def _read(path: pathlib.Path) -> dict | None:
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except ValueError as e:
    raise ConfigError(f"{path} is not valid JSON ({e}); delete it and rerun the stage that wrote "
                      "it") from None


def run_report(ctx: Context) -> str:
  """workdir/report.md: losses and sizes of every model, curves of every training run (PNGs in
  workdir/curves), search ranking, time per stage."""
  cfg, workdir = ctx.cfg, ctx.directory
  lines = ["# Compression report", ""]
  plan = stages.compression_plan(cfg, workdir)
  rows = []
  teacher_loss = None
  for step in plan:
    pruned = _read(step["directory"] / "prune" / "summary.json")
    distilled = _read(step["directory"] / "distill" / "summary.json")
    if pruned is None:
      continue
    teacher_loss = teacher_loss if teacher_loss is not None else pruned["source_validation_loss"]
    if not rows:
      rows.append(("teacher", pruned["source_params"], pruned["source_validation_loss"]))
    name = f"{step['name']} " if step["name"] else ""
    rows.append((f"{name}pruned (zero-shot)", pruned["pruned_params"],
                 pruned["pruned_validation_loss"]))
    if distilled is not None:
      rows.append((f"{name}distilled ({distilled['steps']} steps)", distilled["student_params"],
                   distilled["val_ce"]))
  if rows:
    lines += ["## Validation loss", "",
              "Next-token cross-entropy (nats per token) on the validation split.", "",
              "| model | parameters | validation loss | gap to teacher |", "|---|---|---|---|"]
    for label, params, loss in rows:
      lines.append(f"| {label} | {params:,} | {loss:.4f} | {loss - teacher_loss:+.4f} |")
    lines.append("")
  lines += report_curves.write(cfg, workdir)
  evaluation = workdir / "evaluate" / "table.md"
  if evaluation.exists():
    lines += ["## Evaluation", "", evaluation.read_text().strip(), ""]
  for step in plan:
    search_report = step["directory"] / "search" / "report.md"
    if search_report.exists():
      lines += [f"## Architecture search {step['name']}".rstrip(), "",
                search_report.read_text().strip(), ""]
  timings = _read(workdir / "timings.json") or {}
  if timings:
    lines += ["## Time per stage", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {seconds:.1f} |" for name, seconds in timings.items()]
    lines.append("")
  text = "\n".join(lines)
  atomic.write_text(workdir / "report.md", text)
  ctx.log(f"[report] written to {workdir / 'report.md'}")
  return text
