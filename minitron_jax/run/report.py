"""The `report` stage: one markdown page that says what the compression achieved and what each
stage cost, from what the other stages wrote (evaluate_stage.py scores the models)."""

from __future__ import annotations

import json
import pathlib

from minitron_jax.core import atomic
from minitron_jax.run import registry, report_curves, stage_context
from minitron_jax.errors import ConfigError
from minitron_jax.run.stage_context import Context

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
  plan = stage_context.compression_plan(cfg, workdir)
  rows = []
  teacher_loss = None
  for step in plan:
    pruned = _read(registry.path(step["directory"], "prune", "summary"))
    distilled = _read(registry.path(step["directory"], "distill", "summary"))
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
  for output, title in (("table", "Evaluation"), ("lm_eval", "lm-evaluation-harness"),
                        ("completions", "Sample completions (greedy)")):
    written = registry.path(workdir, "evaluate", output)
    if written.exists():
      lines += [f"## {title}", "", written.read_text().strip(), ""]
  for step in plan:
    search_report = registry.path(step["directory"], "search", "report")
    if search_report.exists():
      lines += [f"## Architecture search {step['name']}".rstrip(), "",
                search_report.read_text().strip(), ""]
  timings = _read(workdir / "timings.json") or {}
  if timings:
    lines += ["## Time per stage", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {seconds:.1f} |" for name, seconds in timings.items()]
    lines.append("")
  text = "\n".join(lines)
  atomic.write_text(registry.path(workdir, "report"), text)
  ctx.log(f"[report] written to {registry.path(workdir, 'report')}")
  return text
