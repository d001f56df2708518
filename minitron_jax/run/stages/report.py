"""The `report` stage: one markdown page that says what the compression achieved and what each
stage cost, from what the other stages wrote (the evaluate stage scores the models), with the
training curves of every distillation and search candidate (core/curves.py draws them).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

from minitron_jax.core import atomic, curves, distributed, plots
from minitron_jax.errors import ConfigError
from minitron_jax.run import registry
from minitron_jax.run.stage_context import CompressionStep, Context


@dataclasses.dataclass(frozen=True)
class ReportSettings:
  """The batch (rows x tokens) one training step sees: distillation and the search's retraining
  both run on distill's batch, micro-batches included, of packed rows."""

  batch_size: int
  seq_len: int

  @property
  def tokens_per_step(self) -> int:
    return self.batch_size * self.seq_len


def _read(path: pathlib.Path) -> dict | None:
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except ValueError as e:
    raise ConfigError(f"{path} is not valid JSON ({e}); delete it and rerun the stage that wrote "
                      "it") from None


def run(ctx: Context, out: registry.Outputs) -> str:
  """workdir/report.md: losses and sizes of every model, curves of every training run (PNGs in
  workdir/curves), search ranking, time per stage."""
  settings: ReportSettings = ctx.settings
  workdir = ctx.directory
  lines = ["# Compression report", ""]
  plan = ctx.plan.compression
  rows = []
  teacher_loss = None
  for step in plan:
    pruned = _read(registry.path(step.directory, "prune", "summary"))
    distilled = _read(registry.path(step.directory, "distill", "summary"))
    if pruned is None:
      continue
    teacher_loss = teacher_loss if teacher_loss is not None else pruned["source_validation_loss"]
    if not rows:
      rows.append(("teacher", pruned["source_params"], pruned["source_validation_loss"]))
    rows.append((f"{step.prefix}pruned (zero-shot)", pruned["pruned_params"],
                 pruned["pruned_validation_loss"]))
    if distilled is not None:
      rows.append((f"{step.prefix}distilled ({distilled['steps']} steps)", distilled["student_params"],
                   distilled["val_ce"]))
  if rows:
    lines += ["## Validation loss", "",
              "Next-token cross-entropy (nats per token) on the validation split.", "",
              "| model | parameters | validation loss | gap to teacher |", "|---|---|---|---|"]
    for label, params, loss in rows:
      lines.append(f"| {label} | {params:,} | {loss:.4f} | {loss - teacher_loss:+.4f} |")
    lines.append("")
  lines += curve_lines(settings, plan, workdir, out.staged("curves"))
  for output, title in (("table", "Evaluation"), ("lm_eval", "lm-evaluation-harness"),
                        ("completions", "Sample completions (greedy)")):
    written = registry.path(workdir, "evaluate", output)
    if written.exists():
      lines += [f"## {title}", "", written.read_text().strip(), ""]
  for step in plan:
    search_report = registry.path(step.directory, "search", "report")
    if search_report.exists():
      lines += [f"## Architecture search {step.name}".rstrip(), "",
                search_report.read_text().strip(), ""]
  timings = _read(workdir / "timings.json") or {}
  if timings:
    lines += ["## Time per stage", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {seconds:.1f} |" for name, seconds in timings.items()]
    lines.append("")
  text = "\n".join(lines)
  atomic.write_text(out.staged("report"), text)
  ctx.log(f"[report] written to {out.final('report')}")
  return text


# ----------------------------------------------------------------------------- curves


def _read_quietly(path: pathlib.Path) -> dict:
  try:
    return json.loads(path.read_text()) if path.exists() else {}
  except ValueError:  # the report's own reading names a damaged file; a curve just goes without
    return {}


def _teachers(workdir: pathlib.Path, plan: tuple[CompressionStep, ...]) -> list:
  """(label, validation loss or None) of each compression stage's teacher: the original (its
  loss from the first stage's prune summary, else from the check stage) or, for
  teacher='previous', the model the stage started from."""
  first = _read_quietly(registry.path(plan[0].directory, "prune", "summary")) if plan else {}
  original = first.get("source_validation_loss",
                       _read_quietly(registry.path(workdir, "check", "metrics")).get("validation_loss"))
  found = []
  for step in plan:
    if step.teacher == "previous":
      pruned = _read_quietly(registry.path(step.directory, "prune", "summary"))
      found.append(("teacher (previous stage)", pruned.get("source_validation_loss")))
    else:
      found.append(("teacher", original))
  return found


def distill_panels(tokens: int, plan: tuple[CompressionStep, ...],
                   workdir: pathlib.Path) -> list[curves.Panel]:
  """A panel per compression stage whose distillation logged anything (`tokens` a step)."""
  panels = []
  for step, (teacher_label, teacher_loss) in zip(plan, _teachers(workdir, plan)):
    records = curves.read_metrics(registry.path(step.directory, "distill", "metrics"))
    if not records:
      continue
    pruned = _read_quietly(registry.path(step.directory, "prune", "summary")).get("pruned_validation_loss")
    series, objective, styles = curves.loss_series(records, tokens, start=pruned)
    panels.append(curves.Panel(step.name, series,
                        curves.finite({teacher_label: teacher_loss, "pruned (zero-shot)": pruned}),
                        styles, objective))
  return panels


def search_panels(tokens: int, plan: tuple[CompressionStep, ...],
                  workdir: pathlib.Path) -> list[curves.Panel]:
  """A panel per compression stage whose search retrained candidates: each candidate's
  validation cross-entropy (in the legend) and training cross-entropy (faint, same colour), or
  its training objective on the second axis when cross-entropy is no part of it."""
  panels = []
  for step, (teacher_label, teacher_loss) in zip(plan, _teachers(workdir, plan)):
    candidates = registry.path(step.directory, "search", "candidates")
    runs = sorted(p.parent for p in candidates.glob("*/metrics.jsonl"))
    best = _read_quietly(registry.path(step.directory, "search", "result")).get("best")
    series, objective, styles = {}, {}, {}
    for index, run in enumerate(runs):
      records = curves.read_metrics(run / "metrics.jsonl")
      name = f"{run.name} (chosen)" if run.name == best else run.name
      colour = f"C{index % 10}"
      validation = curves.points(records, "val_ce", tokens)
      training = curves.points(records, "ce", tokens)
      if training[0]:
        label = f"{run.name}: training cross-entropy"
        series[label] = training
      else:
        training = curves.points(records, "loss", tokens)
        label = f"{run.name}: training objective"
        objective[label] = training
      if training[0]:
        styles[label] = {**curves.TRAIN, "color": colour, "alpha": 0.35, "label": "_nolegend_"}
      if validation[0]:
        label = f"{run.name}: validation cross-entropy"
        series[label] = validation
        styles[label] = {**curves.VALIDATION, "color": colour, "label": name}
    if not series and not objective:
      continue
    # The search never scores a candidate before retraining it; the prune stage scores the one
    # it chose.
    pruned = _read_quietly(registry.path(step.directory, "prune", "summary")).get("pruned_validation_loss")
    panels.append(curves.Panel(step.name, series, curves.finite(
        {teacher_label: teacher_loss, "chosen, pruned (zero-shot)": pruned}), styles, objective))
  return panels


def curve_lines(settings: ReportSettings, plan: tuple[CompressionStep, ...],
                workdir: pathlib.Path, curves_directory: pathlib.Path) -> list[str]:
  """Draws the curves into `curves_directory` (on the primary process) and returns the report's
  lines that show them; [] when nothing was trained."""
  tokens = settings.tokens_per_step
  figures = [(name, alt, title, panels) for name, alt, title, panels in (
      ("distill", "distillation curves", "Distillation", distill_panels(tokens, plan, workdir)),
      ("search", "search candidate curves",
       "Architecture search: validation cross-entropy per candidate (faint: training)",
       search_panels(tokens, plan, workdir)))
      if panels]
  if not figures:
    return []
  lines = ["## Training curves", ""]
  if curves.matplotlib_missing():  # a dependency, so only an install that predates it lacks it
    return lines + ["The curves need matplotlib: `pip install -e .` installs it; then delete "
                    "report.md and rerun the same command.", ""]
  if distributed.is_primary():
    curves_directory.mkdir(parents=True, exist_ok=True)
    for name, _, title, panels in figures:
      plots.save(curves.figure(panels, title), curves_directory / f"{name}.png")
  shown = curves_directory.name
  lines += [f"Loss over tokens seen ({tokens:,} a step: batch "
            f"{settings.batch_size} x {settings.seq_len} tokens). Dashed: the validation "
            "cross-entropy of the teacher and of the pruned model before retraining.", ""]
  lines += [f"![{alt}]({shown}/{name}.png)" for name, alt, _, _ in figures]
  return lines + [""]
