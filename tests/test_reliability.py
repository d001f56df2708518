"""Faults and bad inputs (RELIABILITY.md lists them): corrupt or partial files, a diverging
run, SIGTERM in distillation and search, and kills at any moment during a write."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from minitron_jax.checkpoints import checkpoint, hf
from minitron_jax.compress import importance
from minitron_jax.core import atomic, preemption
from minitron_jax.run import pipeline
from minitron_jax.training import distill, loop
from minitron_jax.errors import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]
TEACHER = REPO / "minitron_jax" / "assets" / "stdlib_teacher"
sys.path.insert(0, str(REPO / "configs"))
import default  # noqa: E402  (configs/ is not a package)


def _small(stages=("importance", "prune", "distill"), **distill_changes):
  config = default.get_config("runlocal")
  config.stages = stages
  config.distill.update(distill_changes)
  return config


def _teacher_copy(tmp_path) -> pathlib.Path:
  return pathlib.Path(shutil.copytree(TEACHER, tmp_path / "teacher"))


def _refused(config, tmp_path) -> str:
  workdir = tmp_path / "run"
  with pytest.raises(ConfigError) as caught:
    pipeline.run(config, workdir)
  assert not workdir.exists()
  assert "\n" not in str(caught.value)
  return str(caught.value)


# ----------------------------------------------------------------------------- atomic outputs


def test_a_failed_directory_write_leaves_the_old_output(tmp_path):
  target = tmp_path / "out"
  with atomic.directory(target) as staging:
    (staging / "a.txt").write_text("old")
  with pytest.raises(RuntimeError):
    with atomic.directory(target) as staging:
      (staging / "a.txt").write_text("new, half")
      raise RuntimeError("killed")
  assert (target / "a.txt").read_text() == "old"
  with atomic.directory(target) as staging:
    (staging / "b.txt").write_text("new")
  assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging, no backup left


def test_leftovers_of_a_killed_write_are_cleaned_or_put_back(tmp_path):
  target = tmp_path / "out"
  (tmp_path / ".out.tmp-stale").mkdir()  # a write killed before its rename
  backup = tmp_path / ".out.old"  # a swap killed between its two renames
  backup.mkdir()
  (backup / "a.txt").write_text("old")
  atomic.recover(target)
  assert (target / "a.txt").read_text() == "old" and not backup.exists()
  with atomic.directory(target) as staging:
    (staging / "a.txt").write_text("new")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
  atomic.write_json(tmp_path / "x.json", {"a": 1})
  assert json.loads((tmp_path / "x.json").read_text()) == {"a": 1}
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "x.json"]


def test_published_outputs_replace_their_namesakes_and_leave_the_work_beside_them(tmp_path):
  stage = tmp_path / "distill"
  (stage / "checkpoints").mkdir(parents=True)  # resumable work, not an output
  (stage / "hf").mkdir()
  (stage / "hf" / "old.json").write_text("old")
  (stage / "report.md").write_text("an earlier run's")
  names = ("hf", "report.md", "summary.json")
  with pytest.raises(RuntimeError, match="killed"):
    with atomic.publish(stage, names, label="distill") as staging:
      (staging / "summary.json").write_text("half")
      raise RuntimeError("killed")
  assert sorted(p.name for p in stage.iterdir()) == ["checkpoints", "hf", "report.md"]
  with atomic.publish(stage, names, label="distill") as staging:
    (staging / "hf").mkdir()
    (staging / "hf" / "new.json").write_text("new")
    (staging / "summary.json").write_text("done")
  # hf replaced whole, the report this run did not write is gone, the work is untouched.
  assert sorted(p.name for p in stage.iterdir()) == ["checkpoints", "hf", "summary.json"]
  assert [p.name for p in (stage / "hf").iterdir()] == ["new.json"]
  with pytest.raises(RuntimeError, match=r"wrote \['stray'\], which are not among its outputs"):
    with atomic.publish(stage, names, label="distill") as staging:
      (staging / "stray").write_text("?")
  assert (stage / "summary.json").read_text() == "done"


def test_the_done_marker_is_published_last(tmp_path, monkeypatch):
  order = []
  replace = atomic.os.replace
  monkeypatch.setattr(atomic.os, "replace", lambda a, b: order.append(pathlib.Path(b).name)
                      or replace(a, b))
  with atomic.publish(tmp_path, ("model", "hf", "summary.json")) as staging:
    for name in ("summary.json", "hf", "model"):
      (staging / name).mkdir() if name != "summary.json" else (staging / name).write_text("{}")
  assert order == ["model", "hf", "summary.json"]


_WRITER = """
import itertools, sys
import jax
import numpy as np
from minitron_jax.checkpoints import checkpoint, hf
from minitron_jax.models import config as config_lib, model
config = config_lib.tiny("llama", num_layers=1)
shapes = model.abstract_params(config)
for version in itertools.count():
  params = jax.tree.map(lambda w: np.full(w.shape, version, np.float32), shapes)
  checkpoint.save_model(sys.argv[1] + "/model", config, params)
  hf.save(sys.argv[1] + "/hf", config, params)
  print(version, flush=True)
"""


def _single_version(params) -> float:
  values = {float(v) for leaf in jax.tree.leaves(params) for v in np.unique(np.asarray(leaf))}
  assert len(values) == 1, f"a mix of versions {sorted(values)}"
  return values.pop()


def test_a_kill_at_any_moment_leaves_the_old_model_or_the_new_one(tmp_path):
  """Writes versions 0, 1, 2, ... of a saved model and an export over and over, SIGKILLs the
  writer in the middle of writing the model, then of the export, then at a random moment, and
  each time finds one whole version in each."""
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  for mid_write in (".model.tmp-*", ".hf.tmp-*", None):
    process = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert process.stdout.readline(), "the writer died"  # one whole version, then overwrites
    if mid_write:
      deadline = time.time() + 60
      while not list(tmp_path.glob(mid_write)) and time.time() < deadline:
        time.sleep(0.001)
      assert list(tmp_path.glob(mid_write)), "never caught the writer mid-write"
    else:
      time.sleep(np.random.default_rng(0).uniform(0, 1))
    process.send_signal(signal.SIGKILL)
    process.wait()
    model_version = _single_version(checkpoint.load_model(tmp_path / "model")[1])
    export_version = _single_version(hf.load(tmp_path / "hf")[1])
    assert export_version in (model_version, model_version - 1)  # the model is written first


# ----------------------------------------------------------------------------- corrupt inputs


def test_a_truncated_safetensors_file_is_one_line_naming_it(tmp_path):
  teacher = _teacher_copy(tmp_path)
  weights = teacher / "model.safetensors"
  weights.write_bytes(weights.read_bytes()[:100_000])
  config = default.get_config()
  config.model.hf_path = str(teacher)
  assert _refused(config, tmp_path) == (
      f"model.hf_path: {weights} is truncated or not a safetensors file (Error while "
      "deserializing header: incomplete metadata, file not fully covered); allowed: a complete "
      "safetensors file")
  with pytest.raises(ConfigError, match="is truncated or not a safetensors file"):
    hf.load(teacher)


def test_a_config_json_that_is_not_json_is_one_line_naming_it(tmp_path):
  teacher = _teacher_copy(tmp_path)
  (teacher / "config.json").write_text('{"model_type": "llama",')
  config = default.get_config()
  config.model.hf_path = str(teacher)
  assert _refused(config, tmp_path).startswith(
      f"model.hf_path: {teacher / 'config.json'} is not valid JSON (Expecting property name")
  (teacher / "config.json").write_text('{"model_type": "llama"}')
  assert _refused(config, tmp_path).startswith(
      f"model.hf_path: {teacher / 'config.json'} lacks ['vocab_size', 'hidden_size', ")


def test_a_config_json_of_another_architecture_names_the_model_types_we_load(tmp_path):
  """Issue 21: a gpt2 config.json was told it lacks vocab_size etc.; its fields are not the
  problem, its architecture is."""
  gpt2 = tmp_path / "gpt2"
  gpt2.mkdir()
  (gpt2 / "config.json").write_text(json.dumps(
      {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 256}))
  config = default.get_config()
  config.model.hf_path = str(gpt2)
  assert _refused(config, tmp_path) == (
      f"model.hf_path: {gpt2 / 'config.json'}: model_type='gpt2' is not supported; allowed: "
      f"{hf.supported_model_types()}")
  assert {"llama", "qwen3_moe", "gemma3"} <= set(hf.supported_model_types())


def test_missing_shards_and_a_bad_index_are_one_line_naming_the_file(tmp_path):
  config, params = hf.load(TEACHER)
  sharded = tmp_path / "sharded"
  hf.save(sharded, config, params, max_shard_bytes=1_500_000)
  index = sharded / "model.safetensors.index.json"
  shards = sorted(sharded.glob("*.safetensors"))
  assert len(shards) == 3
  run_config = default.get_config()
  run_config.model.hf_path = str(sharded)
  shards[1].unlink()
  assert _refused(run_config, tmp_path) == (
      f"model.hf_path: {index} lists 1 shard(s) missing from {sharded}, e.g. {shards[1].name}; "
      "allowed: a complete download")
  index.write_text(index.read_text()[:50])
  assert _refused(run_config, tmp_path).startswith(
      f"model.hf_path: {index} is not a valid safetensors index (JSONDecodeError: ")


# orbax leaves a callback for its closed event loop after a failed restore; harmless here.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_damaged_stage_outputs_are_one_line_naming_them(tmp_path):
  config, params = hf.load(TEACHER)
  saved = tmp_path / "model"
  checkpoint.save_model(saved, config, params)
  for file in (saved / "params").rglob("d/*"):
    file.write_bytes(file.read_bytes()[:10])
  with pytest.raises(ConfigError, match=f"^{saved / 'params'} is damaged and cannot be restored"):
    checkpoint.load_model(saved)
  (saved / "model_config.json").write_text("{")
  with pytest.raises(ConfigError, match=f"^{saved / 'model_config.json'} is damaged"):
    checkpoint.load_config(saved)
  (tmp_path / "scores").mkdir()
  (tmp_path / "scores" / "scores.npz").write_bytes(b"PK\x03\x04 half a zip file")
  with pytest.raises(ConfigError, match=f"^{tmp_path / 'scores' / 'scores.npz'} is damaged"):
    importance.Scores.load(tmp_path / "scores")


def test_cli_bad_input_file_is_one_line_and_exit_2(tmp_path):
  teacher = _teacher_copy(tmp_path)
  (teacher / "model.safetensors").write_bytes(b"")
  result = subprocess.run(
      [sys.executable, "-m", "minitron_jax.main", "--config=configs/default.py",
       f"--config.model.hf_path={teacher}", f"--workdir={tmp_path / 'run'}"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      f"error: model.hf_path: {teacher / 'model.safetensors'} is truncated or not a safetensors "
      "file (Error while deserializing header: header too small); allowed: a complete "
      "safetensors file"]
  assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- divergence


def test_cli_divergence_stops_the_run_before_anything_downstream(tmp_path):
  """Issue 12's example: peak_lr=1e4 diverges; nothing is saved, exported or evaluated."""
  workdir = tmp_path / "run"
  result = subprocess.run(
      [sys.executable, "-m", "minitron_jax.main", "--config=configs/default.py:runlocal",
       "--config.distill.optimizer.peak_lr=1e4", f"--workdir={workdir}"],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 3, result.stderr
  (line,) = result.stderr.strip().splitlines()
  assert line.startswith("error: [distill] diverged at step ")
  step = int(line.split("diverged at step ")[1].split()[0])
  saved = [int(p.name) for p in (workdir / "distill" / "checkpoints").iterdir()
           if p.name.isdigit()]
  if saved:
    assert f"last good checkpoint {workdir / 'distill' / 'checkpoints' / str(max(saved))}" in line
  assert all(s < step for s in saved)
  for output in ("distill/model", "distill/hf", "distill/summary.json", "evaluate", "report.md"):
    assert not (workdir / output).exists(), output


# ----------------------------------------------------------------------------- preemption


def _sigterm_on(marker: str, lines: list):
  """A log function that records lines and sends SIGTERM to this process on the first line
  containing `marker` (as a scheduler would, mid-run)."""
  sent = []

  def log(line):
    lines.append(line)
    if marker in line and not sent:
      sent.append(line)
      os.kill(os.getpid(), signal.SIGTERM)

  return log


def test_sigterm_in_the_distill_stage_saves_and_the_rerun_matches_an_uninterrupted_run(tmp_path):
  config = _small()
  config.stages = ("importance", "prune")
  pipeline.run(config, tmp_path / "straight", log=lambda line: None)
  shutil.copytree(tmp_path / "straight", tmp_path / "stopped")
  config = _small()
  pipeline.run(config, tmp_path / "straight", log=lambda line: None)

  lines = []
  with pytest.raises(preemption.Preempted) as caught:
    pipeline.run(config, tmp_path / "stopped", log=_sigterm_on("[distill] step 2/6", lines))
  assert "[distill] stopped by SIGTERM after step 3/6" in str(caught.value)
  stopped = tmp_path / "stopped" / "distill"
  assert (stopped / "checkpoints" / "3").is_dir()
  assert not (stopped / "model").exists() and not (stopped / "summary.json").exists()

  lines.clear()
  pipeline.run(config, tmp_path / "stopped", log=lines.append)
  assert "[distill] resumed from step 3" in lines

  def records(directory):
    return [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]

  straight = tmp_path / "straight" / "distill"
  assert records(stopped) == records(straight)
  summary = {k: v for k, v in json.loads((stopped / "summary.json").read_text()).items()
             if k != "seconds"}
  assert summary == {k: v for k, v in json.loads((straight / "summary.json").read_text()).items()
                     if k != "seconds"}


def test_sigterm_between_search_candidates_stops_after_saving_progress(tmp_path):
  config = _small(stages=("importance", "search"))
  lines = []
  with pytest.raises(preemption.Preempted, match=r"^\[search\] stopped by SIGTERM after "
                                                 r"candidate (\S+); progress saved in"):
    pipeline.run(config, tmp_path, log=_sigterm_on("step 4/4", lines))
  progress = json.loads((tmp_path / "search" / "progress.json").read_text())
  assert len(progress) == 1 and not (tmp_path / "search" / "result.json").exists()
  (first,) = progress

  lines.clear()
  pipeline.run(config, tmp_path, log=lines.append)
  result = json.loads((tmp_path / "search" / "result.json").read_text())
  assert len(result["candidates"]) == 2
  assert not any(f"candidate {first}:" in line for line in lines)  # not retrained


@pytest.mark.parametrize("raised, code, line", [
    (ConfigError("bad setting"), 2, "error: bad setting"),
    (loop.Diverged("[distill] diverged at step 5"), 3, "error: [distill] diverged at step 5"),
    (preemption.Preempted("[distill] stopped"), 143, "preempted: [distill] stopped"),
])
def test_main_ends_each_fault_in_one_line_and_its_exit_code(monkeypatch, capsys, raised, code,
                                                            line):
  from absl import flags

  from minitron_jax import main

  def run(*args, **kwargs):
    raise raised

  flags.FLAGS(["main", f"--config={REPO / 'configs' / 'default.py'}", "--workdir=/unused"])
  try:
    monkeypatch.setattr(main.pipeline, "run", run)
    with pytest.raises(SystemExit) as caught:
      main.main(["main"])
  finally:
    flags.FLAGS.unparse_flags()
  assert caught.value.code == code
  assert capsys.readouterr().err == line + "\n"
