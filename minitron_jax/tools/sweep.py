"""Ablation sweeps in big_vision's `get_hyper` style: a sweep is a list of points, each point a
dict of config overrides ("config.distill.loss.logit_loss" -> "reverse_kl", plus an optional
"name"), and every point runs the whole pipeline in its own directory.

A sweep file (experiments/sweeps/*.py) defines
  get_config(arg) -> ConfigDict         the settings every point shares (`runlocal` shrinks them)
  get_hyper(h, config) -> list[dict]    the points, built with this module's sweep/product/chain
                                        (config: get_config's, for points derived from it)
  TITLE, FINDING                        the paper table and what it reports
  summarize(results, out) -> Section    its table, verdict and plots (minitron_jax.tools.sweep_report)
"""

from __future__ import annotations

import datetime
import importlib.util
import itertools
import json
import os
import pathlib
import platform
import sys
import time
from types import ModuleType
from typing import Any, Callable, Iterable, Sequence

import ml_collections

from minitron_jax.core import atomic
from minitron_jax.run import pipeline
from minitron_jax.errors import ConfigError

Point = dict[str, Any]
PREFIX = "config."


def sweep(key: str, values: Iterable[Any]) -> list[Point]:
  """One point per value of one setting."""
  if not key.startswith(PREFIX):
    raise ConfigError(f"sweep key {key!r} must start with {PREFIX!r}")
  return [{key: value} for value in values]


def fixed(key: str, value: Any) -> list[Point]:
  return sweep(key, [value])


def named(name: str, overrides: dict[str, Any] | None = None) -> list[Point]:
  """One point with an explicit name (the directory and table label)."""
  return [{"name": name, **(overrides or {})}]


def product(sweeps: Sequence[list[Point]]) -> list[Point]:
  """Every combination, later sweeps varying fastest; names join with ','."""
  points = []
  for combination in itertools.product(*sweeps):
    merged: Point = {}
    names = [p["name"] for p in combination if p.get("name")]  # named("") adds nothing
    for part in combination:
      merged.update({k: v for k, v in part.items() if k != "name"})
    if names:
      merged["name"] = ",".join(names)
    points.append(merged)
  return points


def chain(sweeps: Sequence[list[Point]]) -> list[Point]:
  return [point for points in sweeps for point in points]


def point_name(point: Point) -> str:
  """The explicit name, else `leaf=value` of every override (e.g. 'batch_aggregation=l2')."""
  if "name" in point:
    return str(point["name"])
  parts = [f"{key.rsplit('.', 1)[-1]}={value}" for key, value in point.items()]
  return ",".join(parts) or "base"


def apply(config: ml_collections.ConfigDict, point: Point) -> ml_collections.ConfigDict:
  """A copy of `config` with the point's overrides; a key naming no setting is an error."""
  config = ml_collections.ConfigDict(config.to_dict())
  for key, value in point.items():
    if key == "name":
      continue
    if not key.startswith(PREFIX):
      raise ConfigError(f"sweep key {key!r} must start with {PREFIX!r}")
    *parents, leaf = key[len(PREFIX):].split(".")
    node = config
    for part in parents:
      if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
        raise ConfigError(f"sweep key {key!r} names no setting ({part!r} is not a section)")
      node = node[part]
    if leaf not in node:
      raise ConfigError(f"sweep key {key!r} names no setting; {'.'.join(parents) or 'config'} "
                        f"has {sorted(node.keys())}")
    if isinstance(value, dict):
      value = ml_collections.ConfigDict(value)
    with node.ignore_type():
      node[leaf] = value
  return config


def load(spec: str) -> tuple[str, ModuleType, str]:
  """'experiments/sweeps/aggregation.py:runlocal' -> (name, module, 'runlocal')."""
  path, _, arg = spec.partition(":")
  file = pathlib.Path(path)
  if not file.is_file() or file.suffix != ".py":
    raise ConfigError(f"sweep file {path!r} does not exist; give a path like "
                      "experiments/sweeps/aggregation.py[:runlocal]")
  module_spec = importlib.util.spec_from_file_location(f"sweep_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  for attribute in ("get_config", "get_hyper"):
    if not hasattr(module, attribute):
      raise ConfigError(f"sweep file {path} defines no {attribute}()")
  return file.stem, module, arg


def points_of(module: ModuleType, config: ml_collections.ConfigDict) -> list[Point]:
  points = module.get_hyper(sys.modules[__name__], config)  # this module is the `hyper` argument
  names = [point_name(p) for p in points]
  repeated = sorted({n for n in names if names.count(n) > 1})
  if repeated:
    raise ConfigError(f"sweep points {repeated} appear more than once; give them names")
  bad = [n for n in names if not n or "/" in n or n.startswith(".")]
  if bad:
    raise ConfigError(f"sweep point names {bad} cannot be directory names")
  return points


def hardware() -> dict[str, Any]:
  """Where a sweep ran, for the results page."""
  import jax  # noqa: PLC0415  (only the record needs it)

  cpu = platform.processor() or platform.machine()
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  device = jax.devices()[0]
  memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
  return dict(cpu=cpu, cores=os.cpu_count(), memory_gib=round(memory),
              backend=jax.default_backend(), device=getattr(device, "device_kind", str(device)), devices=jax.device_count(),
              jax=jax.__version__, python=platform.python_version())


def run(spec: str, root: str | pathlib.Path, *, only: Sequence[str] = (),
        log: Callable[[str], None] = print) -> pathlib.Path:
  """Runs every point of a sweep under root/NAME/POINT (finished stages are skipped, so a killed
  sweep resumes); returns root/NAME, which holds sweep.json."""
  name, module, arg = load(spec)
  base = module.get_config(arg)
  points = all_points = points_of(module, base)
  if only:
    unknown = sorted(set(only) - {point_name(p) for p in points})
    if unknown:
      raise ConfigError(f"sweep {name} has no points {unknown}; it has "
                        f"{[point_name(p) for p in points]}")
    points = [p for p in points if point_name(p) in only]
  directory = pathlib.Path(root).absolute() / name
  directory.mkdir(parents=True, exist_ok=True)
  record_path = directory / "sweep.json"
  record = json.loads(record_path.read_text()) if record_path.exists() else {}
  if record.get("arg", arg) != arg:
    raise ConfigError(f"{directory} holds sweep {name}:{record['arg']}, not {name}:{arg}; "
                      "use another root")
  record.update(sweep=name, arg=arg, spec=spec, hardware=hardware(),
                points=record.get("points", {}))
  configs = {point_name(p): apply(base, p) for p in points}  # every override checked up front
  for index, point in enumerate(points):
    label = point_name(point)
    log(f"[sweep {name}] point {index + 1}/{len(points)}: {label}")
    started = time.perf_counter()
    (directory / label).mkdir(exist_ok=True)
    (directory / label / "config.json").write_text(configs[label].to_json_best_effort(indent=2))
    pipeline.run(configs[label], directory / label,
                 log=lambda text, point=label: log(f"  {point} {text}"))
    seconds = time.perf_counter() - started
    previous = record["points"].get(label, {})
    # The pipeline times each stage when it runs (timings.json); a resumed point's skipped
    # stages keep their first time instead of adding the skip.
    timings_path = directory / label / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    ran = previous.get("stage_seconds") != timings
    record["points"][label] = dict(
        overrides={k: v for k, v in point.items() if k != "name"},
        seconds=sum(timings.values()), stage_seconds=timings,
        finished=(datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
                  if ran or "finished" not in previous else previous["finished"]))
    atomic.write_json(record_path, record)
    log(f"[sweep {name}] {label} done in {seconds:.0f}s")
  record["order"] = [point_name(p) for p in all_points]
  atomic.write_json(record_path, record)
  return directory
