"""The evaluate stage's harness tasks and sample completions, and the search ranked by a harness
score, on the embedded default's runlocal (the shipped teacher, nothing downloaded)."""

import json
import os
import pathlib
import sys

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("lm_eval", reason="lm-eval is not installed")

from minitron_jax.compress import search  # noqa: E402
from minitron_jax.run import pipeline, validate  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "configs"))
import default  # noqa: E402  (configs/ is not a package)
import test_validate  # noqa: E402  (its _with sets dotted settings)


def test_default_runlocal_scores_its_own_task_through_the_harness_equal_to_our_evaluator(
    tmp_path):
  config = default.get_config("runlocal")
  assert config.evaluate.lm_eval.own_tasks == "next_line" and config.evaluate.prompts
  lines = []
  pipeline.run(config, tmp_path, log=lines.append)
  metrics = json.loads((tmp_path / "evaluate" / "metrics.json").read_text())
  assert list(metrics) == ["teacher", "pruned", "distilled"]
  for label, values in metrics.items():
    assert values["lm_eval/next_line/acc"] == values["next_line/acc"], label
  assert len({values["next_line/acc"] for values in metrics.values()}) > 1  # not all one value
  # The task the harness ran is kept, reusable with `python -m minitron_jax.lm_eval`.
  yaml = json.loads((tmp_path / "lm_eval_tasks" / "next_line.yaml").read_text())
  assert pathlib.Path(yaml["dataset_kwargs"]["data_files"]["test"]).is_file()
  completions = json.loads((tmp_path / "evaluate" / "completions.json").read_text())
  assert completions["prompts"] == list(config.evaluate.prompts)
  assert list(completions["completions"]) == list(metrics)
  assert all(len(texts) == len(config.evaluate.prompts)
             for texts in completions["completions"].values())
  assert any(text for texts in completions["completions"].values() for text in texts)
  report = (tmp_path / "report.md").read_text()
  assert "## lm-evaluation-harness" in report and "| teacher |" in report
  assert "## Sample completions (greedy)" in report
  for label in metrics:
    assert f"*{label}*" in report


@pytest.mark.parametrize("score_at", ["pruned", "retrained"])
def test_search_ranks_candidates_by_a_harness_score(tmp_path, score_at):
  config = default.get_config("runlocal")
  config.stages = ("importance", "search")
  config.search.score = "lm_eval:next_line/acc"
  config.search.score_at = score_at
  lines = []
  pipeline.run(config, tmp_path, log=lines.append)
  result = search.SearchResult.from_json((tmp_path / "search" / "result.json").read_text())
  assert result.score_name == "lm_eval next_line/acc" and len(result.scores) == 2
  assert result.best.name == result.score_ranking[0]
  assert result.scores[result.best.name] == max(result.scores.values())
  assert result.eval_steps == ((0,) if score_at == "pruned" else tuple(config.search.eval_steps))
  retrained = any("[search " in line and "step" in line for line in lines)
  assert retrained == (score_at == "retrained")
  assert (tmp_path / "search" / "progress.next_line.acc.json").is_file()
  assert "(ranked by it)" in (tmp_path / "search" / "report.md").read_text()


@pytest.mark.parametrize("changes, message", [
    ({"search.score": "mmlu"}, "search.score: search.score='mmlu' is not supported; allowed: '' "
                               "(validation loss) or 'lm_eval:TASK[/METRIC]'"),
    ({"search.score_at": "never"}, "search.score: search.score_at='never' is not supported"),
    ({"search.score": "lm_eval:no_such_task_here"}, "search.score: unknown lm-eval task(s) "
                                                    "['no_such_task_here']"),
    ({"evaluate.lm_eval.own_tasks": "next_line,nope"},
     "evaluate.lm_eval.own_tasks: ['nope'] are not evaluate.tasks entries; allowed: "
     "['next_line']"),
    ({"evaluate.lm_eval.include_path": "/no/such/dir"},
     "evaluate.lm_eval.include_path: '/no/such/dir' is not a directory"),
    ({"evaluate.lm_eval.limit": -1.0}, "evaluate.lm_eval.limit: -1.0 must be 0"),
    ({"evaluate.prompts": ("def f():", "")}, "evaluate.prompts: ('def f():', '') must be a "
                                              "tuple of non-empty strings"),
    ({"evaluate.max_new_tokens": 0}, "evaluate.max_new_tokens: 0 must be a positive integer"),
])
def test_bad_harness_and_completion_settings_are_one_line_before_any_stage(tmp_path, changes,
                                                                           message):
  config = default.get_config("runlocal")
  config.stages = ("importance", "search", "evaluate")
  problems = validate.validate(test_validate._with(config, changes), tmp_path / "run")
  assert any(problem.startswith(message) for problem in problems), problems
  assert not (tmp_path / "run").exists()
