"""Training curves for the run report: loss over tokens seen for every distillation (a panel per
compression stage) and every search candidate, against the teacher's and the pruned model's
validation loss.

A table gives the end points; only a curve shows whether a run had finished improving, diverged
late or was still far from the teacher when it stopped. The curves are read back from the
`metrics.jsonl` each training loop writes (distill.MetricsLog), so a report can be redrawn from a
finished workdir.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any, Mapping

import ml_collections

from minitron_jax.core import atomic, distributed, plots
from minitron_jax.run import registry, stage_context

DIRECTORY = "curves"  # inside the workdir, beside report.md
YLABEL = "cross-entropy (nats per token)"
OBJECTIVE_YLABEL = "training objective"
Series = tuple[tuple[int, ...], tuple[float, ...]]  # (tokens seen, values)

# Validation points get markers (there are few), training lines none (there are many).
_TRAIN = {"marker": None, "linewidth": 1.0, "alpha": 0.8}
_VALIDATION = {"marker": "o", "markersize": 4, "linewidth": 1.8}

# metrics.jsonl key -> label, style, and whether it is the objective. Cross-entropy is drawn
# against the reference losses; the objective (a KL divergence, say, tens of times smaller) gets
# an axis of its own, or it would lie flat along the bottom. Cross-entropy comes first, so that
# when the objective is cross-entropy alone the duplicate dropped is the objective.
_KEYS = (("ce", "training cross-entropy", {**_TRAIN, "color": "C0"}, False),
         ("val_ce", "validation cross-entropy", {**_VALIDATION, "color": "C1"}, False),
         ("loss", "training objective", {**_TRAIN, "color": "C2"}, True),
         ("val_loss", "validation objective", {**_VALIDATION, "color": "C3"}, True))


@dataclasses.dataclass(frozen=True)
class Panel:
  """One axes: cross-entropy series over tokens seen (label -> (tokens, values)) and reference
  levels (label -> loss) drawn as dashed lines; the training objective's series on a second y
  axis; titled by the compression stage's name, if any."""

  title: str
  series: Mapping[str, Series]
  references: Mapping[str, float]
  styles: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
  objective: Mapping[str, Series] = dataclasses.field(default_factory=dict)


def read_metrics(path: pathlib.Path) -> list[dict]:
  """The records of a metrics.jsonl; [] when there is none. A line a kill cut short is skipped
  (the loop drops it too when it resumes)."""
  if not path.exists():
    return []
  records = []
  for line in path.read_text().splitlines():
    try:
      record = json.loads(line)
    except ValueError:
      continue
    if isinstance(record, dict) and "step" in record:
      records.append(record)
  return records


def tokens_per_step(cfg: ml_collections.ConfigDict) -> int:
  """Tokens one training step sees: distillation and the search's retraining both run on
  cfg.distill's batch (the whole batch, micro-batches included) of packed sequences."""
  return cfg.distill.batch_size * cfg.distill.seq_len


def _points(records: list[dict], key: str, tokens: int) -> Series:
  found = [(r["step"] * tokens, float(r[key])) for r in records if key in r]
  return tuple(x for x, _ in found), tuple(y for _, y in found)


def loss_series(records: list[dict], tokens: int, start: float | None = None):
  """(cross-entropy series, objective series, styles) of one run; a series equal to one already
  taken is left out. start: the validation cross-entropy before the first step (the pruned
  model's), drawn at 0."""
  series, objective, styles, taken = {}, {}, {}, []
  for key, label, style, is_objective in _KEYS:
    points = _points(records, key, tokens)
    if not points[0] or points in taken:
      continue
    taken.append(points)
    if key == "val_ce" and start is not None:
      points = ((0, *points[0]), (start, *points[1]))
    (objective if is_objective else series)[label], styles[label] = points, style
  return series, objective, styles


def _read(path: pathlib.Path) -> dict:
  try:
    return json.loads(path.read_text()) if path.exists() else {}
  except ValueError:  # the report's own reading names a damaged file; a curve just goes without
    return {}


def _finite(references: Mapping[str, Any]) -> dict[str, float]:
  return {k: float(v) for k, v in references.items()
          if isinstance(v, (int, float)) and math.isfinite(v)}


def _teachers(workdir: pathlib.Path, plan: list[dict]) -> list:
  """(label, validation loss or None) of each compression stage's teacher: the original (its
  loss from the first stage's prune summary, else from the check stage) or, for
  teacher='previous', the model the stage started from."""
  first = _read(registry.path(plan[0]["directory"], "prune", "summary")) if plan else {}
  original = first.get("source_validation_loss",
                       _read(registry.path(workdir, "check", "metrics")).get("validation_loss"))
  found = []
  for step in plan:
    if step["teacher"] == "previous":
      pruned = _read(registry.path(step["directory"], "prune", "summary"))
      found.append(("teacher (previous stage)", pruned.get("source_validation_loss")))
    else:
      found.append(("teacher", original))
  return found


def distill_panels(cfg: ml_collections.ConfigDict, workdir: pathlib.Path) -> list[Panel]:
  """A panel per compression stage whose distillation logged anything."""
  plan = stage_context.compression_plan(cfg, workdir)
  tokens = tokens_per_step(cfg)
  panels = []
  for step, (teacher_label, teacher_loss) in zip(plan, _teachers(workdir, plan)):
    records = read_metrics(registry.path(step["directory"], "distill", "metrics"))
    if not records:
      continue
    pruned = _read(registry.path(step["directory"], "prune", "summary")).get("pruned_validation_loss")
    series, objective, styles = loss_series(records, tokens, start=pruned)
    panels.append(Panel(step["name"], series,
                        _finite({teacher_label: teacher_loss, "pruned (zero-shot)": pruned}),
                        styles, objective))
  return panels


def search_panels(cfg: ml_collections.ConfigDict, workdir: pathlib.Path) -> list[Panel]:
  """A panel per compression stage whose search retrained candidates: each candidate's
  validation cross-entropy (in the legend) and training cross-entropy (faint, same colour), or
  its training objective on the second axis when cross-entropy is no part of it."""
  plan = stage_context.compression_plan(cfg, workdir)
  tokens = tokens_per_step(cfg)
  panels = []
  for step, (teacher_label, teacher_loss) in zip(plan, _teachers(workdir, plan)):
    candidates = registry.path(step["directory"], "search", "candidates")
    runs = sorted(p.parent for p in candidates.glob("*/metrics.jsonl"))
    best = _read(registry.path(step["directory"], "search", "result")).get("best")
    series, objective, styles = {}, {}, {}
    for index, run in enumerate(runs):
      records = read_metrics(run / "metrics.jsonl")
      name = f"{run.name} (chosen)" if run.name == best else run.name
      colour = f"C{index % 10}"
      validation = _points(records, "val_ce", tokens)
      training = _points(records, "ce", tokens)
      if training[0]:
        label = f"{run.name}: training cross-entropy"
        series[label] = training
      else:
        training = _points(records, "loss", tokens)
        label = f"{run.name}: training objective"
        objective[label] = training
      if training[0]:
        styles[label] = {**_TRAIN, "color": colour, "alpha": 0.35, "label": "_nolegend_"}
      if validation[0]:
        label = f"{run.name}: validation cross-entropy"
        series[label] = validation
        styles[label] = {**_VALIDATION, "color": colour, "label": name}
    if not series and not objective:
      continue
    # The search never scores a candidate before retraining it; the prune stage scores the one
    # it chose.
    pruned = _read(registry.path(step["directory"], "prune", "summary")).get("pruned_validation_loss")
    panels.append(Panel(step["name"], series, _finite(
        {teacher_label: teacher_loss, "chosen, pruned (zero-shot)": pruned}), styles, objective))
  return panels


def figure(panels: list[Panel], title: str):
  """A matplotlib figure with the panels side by side (two to a row)."""
  plt = plots.pyplot()
  columns = min(len(panels), 2)
  rows = -(-len(panels) // columns)
  fig, axes = plt.subplots(rows, columns, figsize=(7.0 * columns, 4.2 * rows), dpi=110,
                           squeeze=False)
  for ax, panel in zip(axes.flat, panels):
    plots.draw_lines(ax, panel.series, hlines=panel.references, styles=panel.styles)
    handles, labels = ax.get_legend_handles_labels()
    if panel.objective:
      twin = ax.twinx()
      plots.draw_lines(twin, panel.objective, styles=panel.styles)
      twin.set_ylabel(OBJECTIVE_YLABEL)
      more = twin.get_legend_handles_labels()
      handles, labels = handles + more[0], labels + [f"{label} (right axis)" for label in more[1]]
    ax.xaxis.set_major_formatter(plots.ticker().EngFormatter(sep=""))
    ax.set_xlim(left=0)  # a run starts from nothing seen, even when its first log comes later
    ax.set(title=panel.title, xlabel="tokens seen", ylabel=YLABEL)
    ax.grid(alpha=0.3)
    ax.legend(handles, labels, fontsize=7)
  for ax in axes.flat[len(panels):]:
    ax.set_visible(False)
  fig.suptitle(title, fontsize=11)
  fig.tight_layout()
  return fig


def matplotlib_missing() -> bool:
  try:
    import matplotlib  # noqa: F401, PLC0415
  except ModuleNotFoundError:
    return True
  return False


def write(cfg: ml_collections.ConfigDict, workdir: pathlib.Path) -> list[str]:
  """Draws workdir/curves/*.png (on the primary process) and returns the report's lines that
  show them; [] when nothing was trained."""
  figures = [(name, alt, title, panels) for name, alt, title, panels in (
      ("distill", "distillation curves", "Distillation", distill_panels(cfg, workdir)),
      ("search", "search candidate curves",
       "Architecture search: validation cross-entropy per candidate (faint: training)",
       search_panels(cfg, workdir)))
      if panels]
  if not figures:
    return []
  lines = ["## Training curves", ""]
  if matplotlib_missing():  # a dependency, so only an install that predates it lacks it
    return lines + ["The curves need matplotlib: `pip install -e .` installs it; then delete "
                    "report.md and rerun the same command.", ""]
  if distributed.is_primary():
    with atomic.directory(workdir / DIRECTORY, collective=False) as staging:
      for name, _, title, panels in figures:
        plots.save(figure(panels, title), staging / f"{name}.png")
  lines += [f"Loss over tokens seen ({tokens_per_step(cfg):,} a step: batch "
            f"{cfg.distill.batch_size} x {cfg.distill.seq_len} tokens). Dashed: the validation "
            "cross-entropy of the teacher and of the pruned model before retraining.", ""]
  lines += [f"![{alt}]({DIRECTORY}/{name}.png)" for name, alt, _, _ in figures]
  return lines + [""]
