"""Ablation sweeps: point construction, config overrides, every sweep file, and one sweep run end
to end through the launcher at its runlocal size (the CI smoke test of experiments/)."""

import json
import math
import pathlib
import subprocess
import sys

import ml_collections
import pytest

from minitron_jax.run import run_config
from minitron_jax.tools import sweep, sweep_report
from minitron_jax.errors import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]
SWEEPS = sorted((REPO / "experiments" / "sweeps").glob("*.py"))


def test_product_and_chain_build_points_in_order():
  points = sweep.product([sweep.sweep("config.a", [1, 2]), sweep.sweep("config.b.c", ["x", "y"])])
  assert points == [{"config.a": 1, "config.b.c": "x"}, {"config.a": 1, "config.b.c": "y"},
                    {"config.a": 2, "config.b.c": "x"}, {"config.a": 2, "config.b.c": "y"}]
  assert [sweep.point_name(p) for p in points][1] == "a=1,c=y"
  named = sweep.product([sweep.named("kd", {"config.a": 1}), sweep.named("long", {"config.b": 2})])
  assert named == [{"name": "kd,long", "config.a": 1, "config.b": 2}]
  assert sweep.chain([sweep.fixed("config.a", 1), sweep.named("base")]) == [
      {"config.a": 1}, {"name": "base"}]
  with pytest.raises(ConfigError, match="must start with 'config.'"):
    sweep.sweep("distill.steps", [1])


def test_apply_overrides_a_copy_and_refuses_unknown_settings():
  base = run_config.base_config()
  changed = sweep.apply(base, {"name": "x", "config.distill.loss.logit_loss": "reverse_kl",
                               "config.prune.target": dict(num_layers=2),
                               "config.distill.loss.hidden_pairs": ((1, 1),)})
  assert changed.distill.loss.logit_loss == "reverse_kl"
  assert base.distill.loss.logit_loss == "forward_kl"
  assert isinstance(changed.prune.target, ml_collections.ConfigDict)
  assert changed.prune.target.to_dict() == {"num_layers": 2}
  with pytest.raises(ConfigError, match=r"'config.distill.los.steps' names no setting"):
    sweep.apply(base, {"config.distill.los.steps": 1})
  with pytest.raises(ConfigError, match=r"'config.distill.step' names no setting; distill has"):
    sweep.apply(base, {"config.distill.step": 1})


def test_load_refuses_a_missing_file_in_one_line(tmp_path):
  with pytest.raises(ConfigError, match=r"sweep file 'nope.py' does not exist"):
    sweep.load("nope.py:runlocal")
  bad = tmp_path / "bad.py"
  bad.write_text("def get_config(arg=''):\n  return None\n")
  with pytest.raises(ConfigError, match="defines no get_hyper"):
    sweep.load(str(bad))


def test_repeated_point_names_are_refused(tmp_path):
  file = tmp_path / "twice.py"
  file.write_text("def get_config(arg=''):\n  return None\n"
                  "def get_hyper(h, config):\n"
                  "  return h.chain([h.sweep('config.seed', [1]), h.sweep('config.seed', [1])])\n")
  _, module, _ = sweep.load(str(file))
  with pytest.raises(ConfigError, match=r"sweep points \['seed=1'\] appear more than once"):
    sweep.points_of(module, None)


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
@pytest.mark.parametrize("arg", ["", "runlocal"])
def test_every_sweep_file_overrides_existing_settings(path, arg):
  name, module, _ = sweep.load(f"{path}:{arg}")
  base = module.get_config(arg)
  points = sweep.points_of(module, base)
  assert points, name
  for point in points:
    sweep.apply(base, point)  # raises on a key that names no setting
  for attribute in ("TITLE", "FINDING", "summarize"):
    assert hasattr(module, attribute), (name, attribute)
  if arg == "runlocal":
    assert base.distill.steps <= 6 and base.importance.num_samples <= 8
  else:
    # Real-model sweeps are sized by what a CPU session can afford on the real model.
    assert (base.distill.steps >= 300 or "search" in base.stages
            or base.model.require_checkpoint)


def test_equal_flops_steps_match_the_flop_ratio():
  _, module, _ = sweep.load(str(REPO / "experiments" / "sweeps" / "kd_vs_ce_vs_random.py"))
  config = module.get_config()
  # Forward FLOPs per token at seq 128, counted by hand: 2 x matmul weights (per layer q/o 128x128,
  # k/v 128x64, MLP 3x128xF; LM head 128x256) + 4 x layers x 128 x 128 for attention.
  teacher = 2 * (4 * (49152 + 3 * 128 * 512) + 32768) + 4 * 4 * 128 * 128  # 4 layers, F=512
  student = 2 * (3 * (49152 + 3 * 128 * 256) + 32768) + 4 * 3 * 128 * 128  # 3 layers, F=256
  ratio = (teacher + 3 * student) / (3 * student)
  assert module.equal_flops_steps(config) == round(config.distill.steps * ratio)


def test_render_marks_missing_and_runlocal_sections_and_includes_notes(tmp_path):
  record = dict(name="a", title="Finding A", finding="paper says", table="| x |\n|---|\n| 1 |",
                verdict="Agrees.", agreement="agrees", plots=["a.png"],
                command="python experiments/sweep.py --sweep=experiments/sweeps/a.py:runlocal",
                size="runlocal",
                hardware=dict(backend="cpu", cores=2, cpu="EPYC", jax="0.10.2"), seconds=90.0,
                points=3, date="2026-11-23")
  (tmp_path / "a.json").write_text(json.dumps(record))
  (tmp_path / "a.md").write_text("Why it differs.")
  page = sweep_report.render(tmp_path, ["a", "b"], intro="Intro.", image_dir="res")
  assert "## 1. Finding A" in page and "**Paper:** paper says" in page
  assert "| 1 | [Finding A](#1) | agrees (runlocal) | 3 | 1.5 |" in page
  assert "![a.png](res/a.png)" in page and "Why it differs." in page
  assert "runlocal smoke size" in page and "1.5 min on 2-core EPYC" in page
  assert "## 2. b\n\nNot run yet: `python experiments/sweep.py --sweep=experiments/sweeps/b.py`" \
      in page


def test_reinitialize_gives_the_target_shape_with_untrained_weights(tmp_path):
  from minitron_jax.run import pipeline

  config = run_config.base_config()
  run_config.runlocal(config)
  config.stages = ("importance", "prune")
  config.prune.reinitialize = True
  pipeline.run(config, tmp_path, log=lambda _: None)
  summary = json.loads((tmp_path / "prune" / "summary.json").read_text())
  assert summary["reinitialized"] and summary["pruned"]["num_layers"] == 3
  # Untrained: close to uniform over the 256 bytes, far above the trained teacher.
  assert abs(summary["pruned_validation_loss"] - math.log(256)) < 0.3
  assert summary["source_validation_loss"] < 2.5


def test_aggregation_sweep_runs_end_to_end_and_renders(tmp_path):
  """The launcher on the cheapest sweep at runlocal size: runs, then writes section and page."""
  results, page = tmp_path / "results", tmp_path / "RESULTS.md"
  command = [sys.executable, "experiments/sweep.py",
             "--sweep=experiments/sweeps/aggregation.py:runlocal", f"--root={tmp_path / 'runs'}",
             f"--results={results}", f"--page={page}"]
  done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  section = json.loads((results / "aggregation.json").read_text())
  assert section["size"] == "runlocal" and section["points"] == 9
  assert (results / "aggregation_zero_shot.png").stat().st_size > 1000
  text = page.read_text()
  assert "Aggregation metrics for activation importance (Table 15)" in text
  assert "batch=l2" in text and "Not run yet" in text
  loaded = sweep_report.read(tmp_path / "runs" / "aggregation")
  losses = [p.prune["pruned_validation_loss"] for p in loaded.points.values()]
  assert len(set(losses)) > 1  # the aggregations select different elements
  assert all(loss > p.prune["source_validation_loss"] for loss, p in
             zip(losses, loaded.points.values()))

  (results / "aggregation.json").unlink()
  rerun = subprocess.run(  # the results script alone rebuilds the section from the runs on disk
      [sys.executable, "experiments/results.py", f"--root={tmp_path / 'runs'}",
       f"--results={results}", f"--page={page}"], cwd=REPO, capture_output=True, text=True,
      timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert json.loads((results / "aggregation.json").read_text())["table"] == section["table"]
  bad = subprocess.run([sys.executable, "experiments/sweep.py", "--sweep=nope.py"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0 and "error: sweep file 'nope.py' does not exist" in bad.stderr
  assert "Traceback" not in bad.stderr


def test_an_unfinished_sweep_is_not_summarised(tmp_path):
  record = dict(sweep="s", arg="", hardware={}, points={"a": dict(overrides={}, seconds=1.0)})
  (tmp_path / "sweep.json").write_text(json.dumps(record))
  with pytest.raises(ConfigError, match="sweep s .* is incomplete .*rerun its command"):
    sweep_report.read(tmp_path)
  (tmp_path / "sweep.json").write_text(json.dumps({**record, "order": ["a", "b"]}))
  with pytest.raises(ConfigError, match=r"points \['b'\] have not finished"):
    sweep_report.read(tmp_path)
  (tmp_path / "sweep.json").write_text(json.dumps({**record, "order": ["a"]}))
  assert list(sweep_report.read(tmp_path).points) == ["a"]


def test_mean_and_error_is_the_standard_error_of_the_mean():
  mean, error = sweep_report.mean_and_error([1.0, 2.0, 3.0])
  assert mean == 2.0 and math.isclose(error, math.sqrt(1.0 / 3.0))  # sd 1 over sqrt(3)
  assert sweep_report.mean_and_error([5.0]) == (5.0, 0.0)
  with pytest.raises(ConfigError, match="at least one value"):
    sweep_report.mean_and_error([])


def test_paired_difference_pairs_runs_by_data_seed(tmp_path):
  def point(name, seed, loss):
    directory = tmp_path / name
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"data": {"seed": seed}}))
    return sweep_report.PointResult(name, directory, {}, 0.0), loss

  losses = {}
  runs, reference = [], []
  for seed, (a, b) in enumerate([(1.0, 1.5), (2.0, 2.4), (3.0, 3.6)]):
    p, losses[f"a{seed}"] = point(f"a{seed}", seed, a)
    q, losses[f"b{seed}"] = point(f"b{seed}", seed, b)
    runs.append(p)
    reference.append(q)
  extra, losses["a9"] = point("a9", 9, 0.0)  # no partner: left out
  mean, error, pairs = sweep_report.paired_difference(runs[::-1] + [extra], reference,
                                                      lambda p: losses[p.name])
  assert pairs == 3 and math.isclose(mean, -0.5)
  assert math.isclose(error, math.sqrt(0.01 / 3))  # differences -0.5, -0.4, -0.6: sd 0.1
