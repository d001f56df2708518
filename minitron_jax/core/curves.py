"""Loss curves of training runs, drawn from the records each training loop writes to its
`metrics.jsonl` (loop.MetricsLog): cross-entropy and the training objective over tokens seen,
against reference levels, in panels side by side (two to a row).

A table gives the end points; only a curve shows whether a run had finished improving, diverged
late or was still far from the teacher when it stopped. The run report draws one figure for the
distillations and one for the search candidates.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any, Mapping

from minitron_jax.core import plots

YLABEL = "cross-entropy (nats per token)"
OBJECTIVE_YLABEL = "training objective"
Series = tuple[tuple[int, ...], tuple[float, ...]]  # (tokens seen, values)

# Validation points get markers (there are few), training lines none (there are many).
TRAIN = {"marker": None, "linewidth": 1.0, "alpha": 0.8}
VALIDATION = {"marker": "o", "markersize": 4, "linewidth": 1.8}

# metrics.jsonl key -> label, style, and whether it is the objective. Cross-entropy is drawn
# against the reference losses; the objective (a KL divergence, say, tens of times smaller) gets
# an axis of its own, or it would lie flat along the bottom. Cross-entropy comes first, so that
# when the objective is cross-entropy alone the duplicate dropped is the objective.
_KEYS = (("ce", "training cross-entropy", {**TRAIN, "color": "C0"}, False),
         ("val_ce", "validation cross-entropy", {**VALIDATION, "color": "C1"}, False),
         ("loss", "training objective", {**TRAIN, "color": "C2"}, True),
         ("val_loss", "validation objective", {**VALIDATION, "color": "C3"}, True))


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


def points(records: list[dict], key: str, tokens: int) -> Series:
  found = [(r["step"] * tokens, float(r[key])) for r in records if key in r]
  return tuple(x for x, _ in found), tuple(y for _, y in found)


def loss_series(records: list[dict], tokens: int, start: float | None = None):
  """(cross-entropy series, objective series, styles) of one run; a series equal to one already
  taken is left out. start: the validation cross-entropy before the first step (the pruned
  model's), drawn at 0."""
  series, objective, styles, taken = {}, {}, {}, []
  for key, label, style, is_objective in _KEYS:
    found = points(records, key, tokens)
    if not found[0] or found in taken:
      continue
    taken.append(found)
    if key == "val_ce" and start is not None:
      found = ((0, *found[0]), (start, *found[1]))
    (objective if is_objective else series)[label], styles[label] = found, style
  return series, objective, styles


def finite(references: Mapping[str, Any]) -> dict[str, float]:
  return {k: float(v) for k, v in references.items()
          if isinstance(v, (int, float)) and math.isfinite(v)}


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
