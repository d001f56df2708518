"""The report's training curves, drawn from a fake workdir's metrics.jsonl files."""

import json
import pathlib
import struct
import sys

from minitron_jax.core import curves
from minitron_jax.run import registry
from minitron_jax.run import plan
from minitron_jax.run.stage_context import Context
from minitron_jax.run.stages import report

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "configs"))
import default  # noqa: E402  (configs/ is not a package)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TOKENS = 4 * 64  # a step's batch x sequence length below


def _config(compression=()):
  config = default.get_config()
  config.distill.batch_size, config.distill.seq_len = 4, 64
  config.compression = compression
  return config


def _write(path: pathlib.Path, value) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(value))


def _metrics(path: pathlib.Path, steps=6, objective=0.9, cut_short=False) -> None:
  """As loop.MetricsLog writes them: training metrics every 2 steps, validation at the end."""
  lines = []
  for step in range(2, steps + 1, 2):
    record = {"step": step, "logit_loss": objective / step, "loss": objective / step,
              "grad_norm": 1.0}
    if step == steps:
      record.update(val_ce=2.0 + 1 / step, val_logit_loss=0.4, val_loss=0.4, val_perplexity=8.0)
    lines.append(json.dumps(record))
  if cut_short:  # a kill mid-line
    lines.append('{"step": 8, "lo')
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("\n".join(lines) + "\n")


def _stage(directory: pathlib.Path, source_loss: float, pruned_loss: float) -> None:
  _write(directory / "prune" / "summary.json", dict(
      source_params=1000, pruned_params=500, source_validation_loss=source_loss,
      pruned_validation_loss=pruned_loss))
  _metrics(directory / "distill" / "metrics.jsonl", cut_short=True)
  _write(directory / "distill" / "summary.json", dict(steps=6, student_params=500, val_ce=2.17))


def _report(directory: pathlib.Path, cfg=None) -> str:
  """The report stage as the pipeline runs it: staged, then published."""
  with registry.staged(directory, "report") as out:
    planned = plan.build_plan(cfg or _config(), directory)
    return report.run(Context(planned, "report", directory, log=lambda _: None), out)


def _panels(kind: str, cfg, directory: pathlib.Path) -> list:
  """The report's panels of `kind` ("distill" or "search") for `cfg` run in `directory`."""
  planned = plan.build_plan(cfg, directory)
  panels = report.distill_panels if kind == "distill" else report.search_panels
  return panels(planned.settings_of("report").tokens_per_step, planned.compression, directory)


def _png_size(path: pathlib.Path) -> tuple[int, int]:
  data = path.read_bytes()
  assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
  return struct.unpack(">II", data[16:24])


def test_report_embeds_distillation_and_search_curves(tmp_path):
  _stage(tmp_path, source_loss=1.5, pruned_loss=3.0)
  for name in ("L2-H64", "L4-H32"):
    _metrics(tmp_path / "search" / "candidates" / name / "metrics.jsonl", steps=4)
  _write(tmp_path / "search" / "result.json", {"best": "L4-H32"})
  text = _report(tmp_path)
  assert "![distillation curves](curves/distill.png)" in text
  assert "![search candidate curves](curves/search.png)" in text
  assert "256 a step: batch 4 x 64 tokens" in text
  assert (tmp_path / "report.md").read_text() == text
  for name in ("distill", "search"):
    path = tmp_path / "curves" / f"{name}.png"
    width, height = _png_size(path)
    assert 600 <= width <= 2000 and 300 <= height <= 1200
    assert 10_000 < path.stat().st_size < 1_000_000
  assert sorted(p.name for p in (tmp_path / "curves").iterdir()) == ["distill.png", "search.png"]

  (distill,) = _panels("distill", _config(), tmp_path)
  assert distill.references == {"teacher": 1.5, "pruned (zero-shot)": 3.0}
  # Tokens on x; validation starts from the pruned model's loss at 0 tokens.
  assert distill.series["validation cross-entropy"] == ((0, 6 * TOKENS), (3.0, 2.0 + 1 / 6))
  # The objective (a KL divergence here) on its own axis; cross-entropy against the references.
  assert distill.objective["training objective"][0] == (2 * TOKENS, 4 * TOKENS, 6 * TOKENS)
  assert distill.objective["validation objective"] == ((6 * TOKENS,), (0.4,))
  (search,) = _panels("search", _config(), tmp_path)
  assert search.references == {"teacher": 1.5, "chosen, pruned (zero-shot)": 3.0}
  assert search.styles["L4-H32: validation cross-entropy"]["label"] == "L4-H32 (chosen)"
  assert search.series["L2-H64: validation cross-entropy"] == ((4 * TOKENS,), (2.25,))
  assert search.objective["L2-H64: training objective"][1] == (0.45, 0.225)

  figure = curves.figure([distill], "Distillation")
  axes, twin = figure.axes
  assert twin.get_ylabel() == curves.OBJECTIVE_YLABEL
  dashed = {line.get_gid(): tuple(line.get_ydata()) for line in axes.lines if line.get_gid()}
  assert dashed == {"teacher": (1.5, 1.5), "pruned (zero-shot)": (3.0, 3.0)}


def test_a_panel_per_compression_stage_with_each_stages_teacher(tmp_path):
  compression = ({"name": "8b", "target": {}, "teacher": "original"},
                 {"name": "4b", "target": {}, "teacher": "previous"})
  _stage(tmp_path / "1_8b", source_loss=1.5, pruned_loss=3.0)
  _stage(tmp_path / "2_4b", source_loss=2.2, pruned_loss=4.0)
  first, second = _panels("distill", _config(compression), tmp_path)
  assert (first.title, second.title) == ("8b", "4b")
  assert second.references == {"teacher (previous stage)": 2.2, "pruned (zero-shot)": 4.0}
  figure = curves.figure([first, second], "Distillation")
  assert len([ax for ax in figure.axes if ax.get_ylabel() == curves.YLABEL]) == 2


def test_cross_entropy_objective_is_drawn_once():
  records = [{"step": 1, "ce": 3.0, "loss": 3.0}, {"step": 2, "ce": 2.5, "loss": 2.5,
                                                   "val_ce": 2.6, "val_loss": 2.6}]
  series, objective, _ = curves.loss_series(records, tokens=10)
  assert series == {"training cross-entropy": ((10, 20), (3.0, 2.5)),
                    "validation cross-entropy": ((20,), (2.6,))}
  assert objective == {}


def test_a_run_without_metrics_reports_without_curves(tmp_path):
  _write(tmp_path / "prune" / "summary.json", dict(
      source_params=1000, pruned_params=500, source_validation_loss=1.5,
      pruned_validation_loss=3.0))
  text = _report(tmp_path)
  assert "| teacher |" in text and "curves" not in text
  assert not (tmp_path / "curves").exists()
  empty = tmp_path / "empty"
  assert _report(empty)
  assert (empty / "report.md").exists()
