"""A run is planned once: the config becomes a frozen, typed plan, validation checks that plan,
and every stage reads its own settings object from it, never the config."""

import ast
import dataclasses
import pathlib
import sys

import pytest

from minitron_jax.errors import ConfigError
from minitron_jax.objectives.losses import LossConfig
from minitron_jax.run import pipeline, plan, registry, stages
from minitron_jax.run.stage_context import Context

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "configs"))
import default  # noqa: E402  (configs/ is not a package)

RUN = REPO / "minitron_jax" / "run"
# The config enters here: the schema, the plan's parsers, validation (the model and mesh it checks
# before the plan) and the pipeline's entry point.
READS_THE_CONFIG = {"run_config", "plan", "validate", "pipeline"}


def test_the_plan_is_frozen_and_holds_each_stage_s_own_typed_settings(tmp_path):
  config = default.get_config()
  config.stages = (*config.stages[:2], "search", *config.stages[2:])
  planned = plan.build_plan(config, tmp_path)
  assert planned.stages == tuple(config.stages)
  assert set(planned.settings) == {"importance", "search", "prune", "distill", "evaluate",
                                   "report"}  # check has none of its own
  for name, settings in planned.settings.items():
    assert dataclasses.is_dataclass(settings), name
    with pytest.raises(dataclasses.FrozenInstanceError):
      setattr(settings, dataclasses.fields(settings)[0].name, None)
  with pytest.raises(dataclasses.FrozenInstanceError):
    planned.eval_batches = 1
  with pytest.raises(TypeError):
    planned.settings["distill"] = None

  distill = planned.settings_of("distill")
  assert distill.losses == LossConfig()  # the default's loss section is every default
  assert (distill.steps, distill.data.batch_size) == (config.distill.steps,
                                                      config.distill.batch_size)
  search = planned.settings_of("search")
  assert search.retrain_steps == config.search.retrain_steps
  assert search.retraining.losses == distill.losses  # the search retrains with distill's loss
  assert search.eval_steps == tuple(config.search.eval_steps)
  prune = planned.settings_of("prune")
  assert prune.selection.depth_criterion == config.prune.depth_criterion
  assert prune.calibration is None  # one round: the importance stage's scores
  importance = planned.settings_of("importance")
  assert importance.num_batches == config.importance.num_samples // config.importance.batch_size
  assert planned.compression[0].target == dict(config.prune.target)
  assert planned.model.hf_path == config.model.hf_path


def test_a_bad_setting_raises_one_line_without_problems_to_note_it_in(tmp_path):
  config = default.get_config()
  config.distill.log_every = 0
  with pytest.raises(ConfigError, match="^distill: log_every=0 must be a positive integer$"):
    plan.build_plan(config, tmp_path)


def _config_reads(path: pathlib.Path) -> list[str]:
  """Where a module imports ml_collections or names a `cfg` (the config, by this code's habit)."""
  found = []
  for node in ast.walk(ast.parse(path.read_text())):
    imported = ([a.name for a in node.names] if isinstance(node, ast.Import)
                else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
    if any(name.startswith("ml_collections") for name in imported):
      found.append(f"{path.name}:{node.lineno} imports ml_collections")
    if isinstance(node, (ast.Name, ast.arg)) and getattr(node, "id", getattr(node, "arg", "")) == "cfg":
      found.append(f"{path.name}:{node.lineno} names cfg")
    if isinstance(node, ast.Attribute) and node.attr == "cfg":
      found.append(f"{path.name}:{node.lineno} reads .cfg")
  return found


def test_no_stage_or_helper_reads_the_config():
  modules = [p for p in [*RUN.glob("*.py"), *(RUN / "stages").glob("*.py")]
             if p.stem not in READS_THE_CONFIG]
  assert len(modules) > 15
  assert [line for path in modules for line in _config_reads(path)] == []
  assert "cfg" not in {field.name for field in dataclasses.fields(Context)}


def test_the_checker_finds_a_config_read(tmp_path):  # the check above is not vacuous
  module = tmp_path / "reader.py"
  module.write_text("import ml_collections\n\ndef run(ctx):\n  return ctx.cfg.distill\n")
  assert _config_reads(module) == ["reader.py:1 imports ml_collections", "reader.py:4 reads .cfg"]


def test_a_run_is_planned_once_and_each_stage_gets_its_settings_from_it(tmp_path, monkeypatch):
  built, seen = [], []
  build_plan = plan.build_plan

  def counting(*args, **kwargs):
    built.append(args)
    return build_plan(*args, **kwargs)

  def report(ctx, out):
    seen.append(ctx)
    (out.staged("report")).write_text("# report\n")

  monkeypatch.setattr(plan, "build_plan", counting)
  monkeypatch.setattr(stages.module("report"), "run", report)
  config = default.get_config()
  config.stages = ("report",)
  pipeline.run(config, tmp_path / "run", log=lambda _: None)
  assert len(built) == 1
  (ctx,) = seen
  assert ctx.stage == "report" and ctx.settings is ctx.plan.settings["report"]
  assert ctx.settings.tokens_per_step == config.distill.batch_size * config.distill.seq_len
  assert registry.path(tmp_path / "run", "report").read_text() == "# report\n"
