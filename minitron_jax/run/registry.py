"""Every stage of the main job, stated once: its name, whether it runs once per run or once per
compression stage, the outputs it writes and the outputs of other stages it reads.

The pipeline runs the stages in this order and skips one whose `done` output exists; validation
says which missing output a stage needs; the stages, the report, its curves and the sweep reports
find every output through `path`. No stage name or output path is written anywhere else, and no
stage module imports another for them (this module imports nothing of the run layer).

  teacher_correction -> check -> [teacher_logits -> importance -> search -> prune -> distill]
  per compression stage -> evaluate -> report
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Mapping

from minitron_jax.errors import ConfigError

RUN = "run"  # once, in the workdir
COMPRESSION = "compression"  # once per compression stage, in that stage's directory


@dataclasses.dataclass(frozen=True)
class Stage:
  """name; scope RUN or COMPRESSION; outputs: output name -> path below the directory it runs in
  ("done" marks the stage finished); needs: "stage.output" it reads from the same directory."""

  name: str
  scope: str
  outputs: Mapping[str, str]
  needs: tuple[str, ...] = ()


STAGES = (
    Stage("teacher_correction", RUN, {"done": "teacher_correction/summary.json",
                                      "model": "teacher_correction/model",
                                      "directory": "teacher_correction"}),
    Stage("check", RUN, {"done": "check/metrics.json", "metrics": "check/metrics.json",
                         "report": "check/report.md", "hf": "check/hf", "directory": "check"}),
    Stage("teacher_logits", COMPRESSION, {"done": "teacher_logits/summary.json",
                                          "train": "teacher_logits/train",
                                          "validation": "teacher_logits/validation",
                                          "directory": "teacher_logits"}),
    Stage("importance", COMPRESSION, {"done": "importance/summary.json",
                                      "scores": "importance/scores.npz",
                                      "directory": "importance"}),
    Stage("search", COMPRESSION, {"done": "search/result.json", "result": "search/result.json",
                                  "report": "search/report.md",
                                  "candidates": "search/candidates", "directory": "search"},
          needs=("importance.scores",)),
    Stage("prune", COMPRESSION, {"done": "prune/summary.json", "summary": "prune/summary.json",
                                 "model": "prune/model", "hf": "prune/hf",
                                 "directory": "prune"},
          needs=("importance.scores",)),
    Stage("distill", COMPRESSION, {"done": "distill/summary.json",
                                   "summary": "distill/summary.json", "model": "distill/model",
                                   "hf": "distill/hf", "metrics": "distill/metrics.jsonl",
                                   "directory": "distill"},
          needs=("prune.model",)),
    Stage("evaluate", RUN, {"done": "evaluate/metrics.json", "metrics": "evaluate/metrics.json",
                            "table": "evaluate/table.md", "lm_eval": "evaluate/lm_eval.md",
                            "completions": "evaluate/completions.md",
                            "completions_json": "evaluate/completions.json",
                            "directory": "evaluate"}),
    Stage("report", RUN, {"done": "report.md"}),
)
BY_NAME = {stage.name: stage for stage in STAGES}
NAMES = tuple(BY_NAME)
COMPRESSION_STAGES = tuple(stage.name for stage in STAGES if stage.scope == COMPRESSION)
_FIRST = NAMES.index(COMPRESSION_STAGES[0])
BEFORE_COMPRESSION = tuple(name for name in NAMES[:_FIRST] if BY_NAME[name].scope == RUN)
AFTER_COMPRESSION = tuple(name for name in NAMES[_FIRST:] if BY_NAME[name].scope == RUN)


def path(directory: str | pathlib.Path, stage: str, output: str = "done") -> pathlib.Path:
  """Where `stage` writes `output`, below the directory it runs in."""
  outputs = BY_NAME[stage].outputs
  if output not in outputs:
    raise KeyError(f"stage {stage!r} has no output {output!r}; it has {sorted(outputs)}")
  return pathlib.Path(directory) / outputs[output]


def inside(stage_directory: str | pathlib.Path, stage: str, output: str) -> pathlib.Path:
  """Where `output` goes below the stage's own directory (a staging copy of it, say)."""
  own = pathlib.PurePosixPath(BY_NAME[stage].outputs["directory"])
  return pathlib.Path(stage_directory) / pathlib.PurePosixPath(
      BY_NAME[stage].outputs[output]).relative_to(own)


def check_names(names) -> None:
  """One line when `config.stages` names a stage that does not exist."""
  unknown = [name for name in names if name not in BY_NAME]
  if unknown:
    raise ConfigError(f"stages {unknown} are unknown; allowed: {list(NAMES)}")


def missing_need(directory: pathlib.Path, stage: str, need: str, stages: set[str]) -> str | None:
  """The one-line problem when `stage` will read `need` ("stage.output") from `directory` and
  neither the run produces it nor an earlier run left it; None when it is there or will be."""
  producer, output = need.split(".")
  if producer in stages or path(directory, producer, output).exists():
    return None
  return (f"{stage} needs {producer}'s {output} at {path(directory, producer, output)}, which "
          f"does not exist; allowed: '{producer}' in stages")
