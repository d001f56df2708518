"""Every stage of the main job, stated once: its name, whether it runs once per run or once per
compression stage, the outputs it publishes, the work it keeps in place and the outputs of other
stages it reads.

The pipeline runs the stages in this order, each from its module `run/stages/<name>.py`, and
skips one whose `done` output exists; validation says which missing output a stage needs; the
stages, the report and the sweep reports find every file through `path`. No stage name or output
path is written anywhere else, and no stage module imports another.

Every stage writes alike: its outputs into a staging directory, published into the stage's
directory when it returns (`staged`), its done marker last; its resumable work (training
checkpoints, a search's progress, the teacher store's shards) in place, where a rerun finds it.

  teacher_correction -> check -> [teacher_logits -> importance -> search -> prune -> distill]
  per compression stage -> evaluate -> report
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
from typing import Iterator, Mapping

from minitron_jax.core import atomic
from minitron_jax.errors import ConfigError

RUN = "run"  # once, in the workdir
COMPRESSION = "compression"  # once per compression stage, in that stage's directory


@dataclasses.dataclass(frozen=True)
class Stage:
  """name; scope RUN or COMPRESSION; directory: the stage's own, below the directory it runs in
  ("" for that directory itself); outputs: name -> path below the directory it runs in, published
  whole when the stage returns (each inside `directory`); done: the output that marks the stage
  finished; work: name -> path the stage writes in place as it goes; needs: "stage.output" it
  reads from the same directory."""

  name: str
  scope: str
  directory: str
  outputs: Mapping[str, str]
  done: str
  work: Mapping[str, str] = dataclasses.field(default_factory=dict)
  needs: tuple[str, ...] = ()

  def __post_init__(self):
    assert self.done in self.outputs, f"{self.name}: done={self.done!r} is not an output"
    for name, where in self.outputs.items():
      parent = pathlib.PurePosixPath(where).parent
      assert str(parent) == (self.directory or "."), (
          f"{self.name}: output {name}={where!r} is not directly in {self.directory!r}")

  @property
  def published(self) -> tuple[str, ...]:
    """The file names the stage publishes, in order, its done marker last."""
    names = dict.fromkeys(pathlib.PurePosixPath(p).name for p in self.outputs.values())
    marker = pathlib.PurePosixPath(self.outputs[self.done]).name
    return (*(name for name in names if name != marker), marker)


STAGES = (
    Stage("teacher_correction", RUN, "teacher_correction",
          {"summary": "teacher_correction/summary.json", "model": "teacher_correction/model"},
          done="summary",
          work={"checkpoints": "teacher_correction/checkpoints",
                "metrics": "teacher_correction/metrics.jsonl",
                "tensorboard": "teacher_correction/tensorboard"}),
    Stage("check", RUN, "check",
          {"metrics": "check/metrics.json", "report": "check/report.md", "hf": "check/hf"},
          done="metrics"),
    Stage("teacher_logits", COMPRESSION, "teacher_logits",
          {"summary": "teacher_logits/summary.json"}, done="summary",
          work={"train": "teacher_logits/train", "validation": "teacher_logits/validation"}),
    Stage("importance", COMPRESSION, "importance",
          {"summary": "importance/summary.json", "scores": "importance/scores.npz",
           "summary_md": "importance/summary.md"},
          done="summary"),
    Stage("search", COMPRESSION, "search",
          {"result": "search/result.json", "report": "search/report.md"}, done="result",
          work={"candidates": "search/candidates", "progress": "search/progress.json",
                "harness_tasks": "search/lm_eval_tasks"},
          needs=("importance.scores",)),
    Stage("prune", COMPRESSION, "prune",
          {"summary": "prune/summary.json", "model": "prune/model", "hf": "prune/hf"},
          done="summary", needs=("importance.scores",)),
    Stage("distill", COMPRESSION, "distill",
          {"summary": "distill/summary.json", "model": "distill/model", "hf": "distill/hf"},
          done="summary",
          work={"checkpoints": "distill/checkpoints", "metrics": "distill/metrics.jsonl",
                "tensorboard": "distill/tensorboard"},
          needs=("prune.model",)),
    Stage("evaluate", RUN, "evaluate",
          {"metrics": "evaluate/metrics.json", "table": "evaluate/table.md",
           "lm_eval": "evaluate/lm_eval.md", "completions": "evaluate/completions.md",
           "completions_json": "evaluate/completions.json"},
          done="metrics", work={"harness_tasks": "lm_eval_tasks"}),
    Stage("report", RUN, "", {"report": "report.md", "curves": "curves"}, done="report"),
)
BY_NAME = {stage.name: stage for stage in STAGES}
NAMES = tuple(BY_NAME)
COMPRESSION_STAGES = tuple(stage.name for stage in STAGES if stage.scope == COMPRESSION)
_FIRST = NAMES.index(COMPRESSION_STAGES[0])
BEFORE_COMPRESSION = tuple(name for name in NAMES[:_FIRST] if BY_NAME[name].scope == RUN)
AFTER_COMPRESSION = tuple(name for name in NAMES[_FIRST:] if BY_NAME[name].scope == RUN)


def original_copy(workdir: str | pathlib.Path) -> pathlib.Path:
  """Where the first stage that reads the original checkpoint leaves its copy, which every later
  stage restores (checkpoints/converted.py)."""
  return pathlib.Path(workdir) / "original"


def path(directory: str | pathlib.Path, stage: str, output: str = "done") -> pathlib.Path:
  """Where `stage` puts `output` (an output, a work entry, "done" or "directory"), below the
  directory it runs in."""
  entry = BY_NAME[stage]
  if output == "directory":
    return pathlib.Path(directory) / entry.directory
  where = {**entry.work, **entry.outputs, "done": entry.outputs[entry.done]}
  if output not in where:
    raise KeyError(f"stage {stage!r} has no output {output!r}; it has {sorted(where)}")
  return pathlib.Path(directory) / where[output]


@dataclasses.dataclass(frozen=True)
class Outputs:
  """Where one run of a stage writes: `staged(name)` for an output (published when the stage
  returns), `work(name)` for what it keeps in place, `final(name)` for where an output ends up."""

  stage: str
  directory: pathlib.Path  # the directory the stage runs in
  staging: pathlib.Path

  def staged(self, output: str) -> pathlib.Path:
    entry = BY_NAME[self.stage]
    if output not in entry.outputs:
      raise KeyError(f"stage {self.stage!r} publishes no {output!r}; it has "
                     f"{sorted(entry.outputs)}")
    return self.staging / pathlib.PurePosixPath(entry.outputs[output]).name

  def work(self, output: str) -> pathlib.Path:
    if output not in BY_NAME[self.stage].work:
      raise KeyError(f"stage {self.stage!r} keeps no work {output!r}")
    return path(self.directory, self.stage, output)

  def final(self, output: str = "directory") -> pathlib.Path:
    return path(self.directory, self.stage, output)


@contextlib.contextmanager
def staged(directory: str | pathlib.Path, stage: str) -> Iterator[Outputs]:
  """Outputs of one run of `stage` in `directory`, published into the stage's directory when the
  block ends without an error (atomic.publish: each whole, the done marker last)."""
  entry = BY_NAME[stage]
  directory = pathlib.Path(directory).absolute()
  with atomic.publish(directory / entry.directory, entry.published, label=stage) as staging:
    yield Outputs(stage, directory, staging)


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
