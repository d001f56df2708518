"""From sweep outputs to experiments/RESULTS.md: read each point's stage summaries, let the sweep
file turn them into a table, a verdict and plots, keep that as results/NAME.json, and render every
kept section into one page.

A section's numbers are regenerated only by running its sweep; the page is re-rendered from the
kept JSON, so running one sweep never drops another's section. Hand-written notes on a finding
live in results/NAME.md and are shown under its table.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import math
import pathlib
from types import ModuleType
from typing import Any, Mapping, Sequence

import ml_collections

from minitron_jax.compress import importance, search
from minitron_jax.core import atomic, plots
from minitron_jax.run import registry
from minitron_jax.errors import ConfigError


def read_json(path: pathlib.Path) -> Any:
  return json.loads(path.read_text()) if path.exists() else None


@dataclasses.dataclass(frozen=True)
class PointResult:
  """What one sweep point's pipeline run left in its directory."""

  name: str
  directory: pathlib.Path
  overrides: Mapping[str, Any]
  seconds: float

  def summary(self, stage: str) -> dict:
    found = read_json(registry.path(self.directory, stage, "summary"))
    if found is None:
      raise ConfigError(f"sweep point {self.name} has no {stage} summary in {self.directory}; "
                        "run its sweep first")
    return found

  @property
  def prune(self) -> dict:
    return self.summary("prune")

  @property
  def distill(self) -> dict:
    return self.summary("distill")

  @functools.cached_property
  def config(self) -> ml_collections.ConfigDict:
    """The full settings this point ran with."""
    found = read_json(self.directory / "config.json")
    if found is None:
      raise ConfigError(f"sweep point {self.name} has no config.json in {self.directory}")
    return ml_collections.ConfigDict(found)

  @property
  def evaluation(self) -> dict:
    """label ('teacher', 'pruned', 'distilled') -> metrics of the evaluate stage; {} if it did
    not run."""
    return read_json(registry.path(self.directory, "evaluate", "metrics")) or {}

  def metrics(self) -> list[dict]:
    path = registry.path(self.directory, "distill", "metrics")
    if not path.exists():
      raise ConfigError(f"sweep point {self.name} has no distillation metrics at {path}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

  def curve(self, key: str = "val_ce") -> tuple[list[int], list[float]]:
    """(steps, values) of one logged metric; validation loss by default, with the pruned model's
    zero-shot loss as step 0."""
    records = [r for r in self.metrics() if key in r]
    steps, values = [r["step"] for r in records], [r[key] for r in records]
    if key == "val_ce":
      steps, values = [0] + steps, [self.prune["pruned_validation_loss"]] + values
    return steps, values

  @functools.cached_property
  def scores(self) -> importance.Scores:
    return importance.Scores.load(registry.path(self.directory, "importance", "directory"))

  @functools.cached_property
  def search(self) -> search.SearchResult:
    path = registry.path(self.directory, "search", "result")
    if not path.exists():
      raise ConfigError(f"sweep point {self.name} has no search result at {path}")
    return search.SearchResult.from_json(path.read_text())


@dataclasses.dataclass(frozen=True)
class SweepResults:
  name: str
  arg: str
  points: dict[str, PointResult]
  hardware: dict
  seconds: float
  finished: str = ""  # ISO time the last point finished

  def __getitem__(self, name: str) -> PointResult:
    if name not in self.points:
      raise ConfigError(f"sweep {self.name} has no point {name!r}; it has {list(self.points)}")
    return self.points[name]

  @property
  def runlocal(self) -> bool:
    return "runlocal" in self.arg


def read(directory: str | pathlib.Path) -> SweepResults:
  """The results of a sweep `minitron_jax.tools.sweep.run` wrote to `directory`."""
  directory = pathlib.Path(directory)
  record = read_json(directory / "sweep.json")
  if record is None:
    raise ConfigError(f"{directory} holds no sweep.json; run the sweep first")
  order = record.get("order")  # written once every point has run
  missing = [name for name in order or () if name not in record["points"]]
  if order is None or missing:
    raise ConfigError(f"sweep {record['sweep']} in {directory} is incomplete "
                      f"({'points ' + str(missing) + ' have' if missing else 'it has'} not "
                      "finished); rerun its command, which resumes it")
  points = {name: PointResult(name, directory / name, record["points"][name]["overrides"],
                              record["points"][name]["seconds"]) for name in order}
  finished = max((record["points"][name].get("finished", "") for name in order), default="")
  return SweepResults(record["sweep"], record["arg"], points, record["hardware"],
                      sum(p.seconds for p in points.values()), finished)


AGREEMENT = ("agrees", "in part", "disagrees")


@dataclasses.dataclass(frozen=True)
class Section:
  """What a sweep file's summarize() returns: a markdown table, a one-line verdict on the
  paper's direction, the PNG files it wrote, and the verdict in one word."""

  table: str
  verdict: str
  plots: tuple[str, ...] = ()
  agreement: str = "agrees"  # one of AGREEMENT

  def __post_init__(self):
    if self.agreement not in AGREEMENT:
      raise ConfigError(f"agreement={self.agreement!r} is not one of {AGREEMENT}")


def paired_difference(runs: Sequence[PointResult], reference: Sequence[PointResult],
                      value) -> tuple[float, float, int]:
  """Mean and standard error of value(run) - value(reference run with the same data seed), over
  the seeds both have, and how many. Runs with one seed share calibration samples and batches, so
  the paired difference is much less noisy than the difference of the two means."""
  by_seed = {p.config.data.seed: value(p) for p in reference}
  differences = [value(p) - by_seed[p.config.data.seed] for p in runs
                 if p.config.data.seed in by_seed]
  if not differences:
    raise ConfigError("paired_difference: the two settings share no data seed")
  return (*mean_and_error(differences), len(differences))


# ----------------------------------------------------------------------------- tables and plots


def mean_and_error(values: Sequence[float]) -> tuple[float, float]:
  """Mean and its standard error (sample standard deviation / sqrt(n); 0 for one value)."""
  values = list(values)
  if not values:
    raise ConfigError("mean_and_error needs at least one value")
  mean = sum(values) / len(values)
  if len(values) < 2:
    return mean, 0.0
  variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
  return mean, math.sqrt(variance / len(values))


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  def cell(value):
    return f"{value:.4f}" if isinstance(value, float) else str(value)

  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)


def plot_lines(path: pathlib.Path, series: Mapping[str, tuple[Sequence, Sequence]], *, title: str,
               xlabel: str, ylabel: str, hlines: Mapping[str, float] | None = None,
               ylim: tuple[float, float] | None = None, invert_y: bool = False,
               markers: bool = True, legend_outside: bool = False) -> str:
  """One line per series; dashed horizontal references (e.g. the teacher's loss)."""
  plt = plots.pyplot()
  figure, axes = plt.subplots(figsize=(8.6 if legend_outside else 6.4, 4.0), dpi=110)
  plots.draw_lines(axes, series, hlines=hlines, markers=markers)
  if ylim:
    axes.set_ylim(*ylim)
  if invert_y:
    axes.invert_yaxis()
  axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
  axes.grid(alpha=0.3)
  if legend_outside:
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
  else:
    axes.legend(fontsize=8)
  figure.tight_layout()
  return plots.save(figure, path)


def plot_bars(path: pathlib.Path, groups: Mapping[str, Mapping[str, float]], *, title: str,
              ylabel: str, hline: tuple[str, float] | None = None,
              ylim: tuple[float, float] | None = None) -> str:
  """Grouped bars: groups[x label][series] = value."""
  plt = plots.pyplot()
  labels = list(groups)
  series = list(dict.fromkeys(s for values in groups.values() for s in values))
  width = 0.8 / max(len(series), 1)
  figure, axes = plt.subplots(figsize=(6.4, 4.0), dpi=110)
  for i, name in enumerate(series):
    xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(labels))]
    axes.bar(xs, [groups[label].get(name, float("nan")) for label in labels], width, label=name)
  if hline:
    axes.axhline(hline[1], linestyle="--", color="gray", linewidth=1, label=hline[0])
  if ylim:
    axes.set_ylim(*ylim)
  axes.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
  axes.set(title=title, ylabel=ylabel)
  axes.grid(axis="y", alpha=0.3)
  if len(series) > 1 or hline:
    axes.legend(fontsize=8, loc="upper left")
  figure.tight_layout()
  return plots.save(figure, path)


# ----------------------------------------------------------------------------- the page


def command(name: str, arg: str = "") -> str:
  spec = f"experiments/sweeps/{name}.py" + (f":{arg}" if arg else "")
  return f"python experiments/sweep.py --sweep={spec}"


def write_section(module: ModuleType, results: SweepResults, results_dir: pathlib.Path) -> dict:
  """Runs the sweep file's summarize() and keeps its section as results_dir/NAME.json."""
  results_dir.mkdir(parents=True, exist_ok=True)
  section = module.summarize(results, results_dir)
  record = dict(
      name=results.name, title=module.TITLE, finding=module.FINDING, table=section.table,
      verdict=section.verdict, agreement=section.agreement, plots=list(section.plots),
      command=command(results.name, results.arg),
      size="runlocal" if results.runlocal else "full", hardware=results.hardware,
      seconds=results.seconds, points=len(results.points),
      date=results.finished[:10] or datetime.date.today().isoformat())
  atomic.write_json(results_dir / f"{results.name}.json", record)
  return record


def _hardware_line(hardware: dict) -> str:
  memory = f" ({hardware['memory_gib']} GiB)" if hardware.get("memory_gib") else ""
  where = (f"{hardware.get('cores')}-core {hardware.get('cpu')}{memory}, no accelerator"
           if hardware.get("backend") == "cpu" else
           f"{hardware.get('devices')}× {hardware.get('device')}")
  return f"{where}, jax {hardware.get('jax')}"


def render(results_dir: pathlib.Path, order: Sequence[str], *, intro: str = "",
           image_dir: str = "results",
           title: str = "Results: the Minitron paper's findings at small scale") -> str:
  """A results page: every kept section in `order`; a sweep not yet run says so. `image_dir` is
  results_dir as seen from the page."""
  lines = [f"# {title}", ""]
  if intro:
    lines += [intro.strip(), ""]
  records = {name: read_json(results_dir / f"{name}.json") for name in order}
  done = [r for r in records.values() if r is not None]
  if done:
    lines += ["| # | finding | ours vs the paper | runs | minutes |", "|---|---|---|---|---|"]
    for index, (name, record) in enumerate(records.items(), start=1):
      if record is None:
        lines.append(f"| {index} | {name} | not run yet | | |")
        continue
      size = "" if record["size"] == "full" else " (runlocal)"
      lines.append(f"| {index} | [{record['title']}](#{index}) | {record.get('agreement', '')}"
                   f"{size} | {record['points']} | {record['seconds'] / 60:.1f} |")
    hardware = {_hardware_line(r["hardware"]) for r in done}
    lines += ["", f"{sum(r['seconds'] for r in done) / 60:.0f} min of runs in all, on "
              f"{'; '.join(sorted(hardware))}.", ""]
  for index, (name, record) in enumerate(records.items(), start=1):
    if record is None:
      lines += [f"## {index}. {name}", "", "Not run yet: " f"`{command(name)}`", ""]
      continue
    minutes = record["seconds"] / 60
    lines += [f'<a id="{index}"></a>', "", f"## {index}. {record['title']}", "",
              f"**Paper:** {record['finding']}", "",
              record["table"], "",
              f"**Ours:** {record['verdict']}", ""]
    lines += [f"![{plot}]({image_dir}/{plot})" for plot in record["plots"]]
    if record["plots"]:
      lines.append("")
    notes = results_dir / f"{name}.md"
    if notes.exists():
      lines += [notes.read_text().strip(), ""]
    size = "" if record["size"] == "full" else " (**runlocal smoke size, not the full sweep**)"
    runs = f"{record['points']} run{'s' if record['points'] != 1 else ''}"
    lines += [f"Regenerate: `{record['command']}`{size}. {runs}, "
              f"{minutes:.1f} min on {_hardware_line(record['hardware'])}, {record['date']}.", ""]
  return "\n".join(lines)
