"""One run per workdir (issue 21): the lock names its holder, a second run is refused in one line,
a dead run's lock is taken over, and the lock goes when the run ends, however it ends."""

import datetime
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys

import pytest

from minitron_jax.core import distributed, preemption, workdir_lock
from minitron_jax.run import pipeline, stages
from minitron_jax.errors import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "configs"))
import default  # noqa: E402  (configs/ is not a package)

# A run holding the workdir in another process until a signal ends it.
_HOLD = """
import sys, time
from minitron_jax.core import workdir_lock
with workdir_lock.held(sys.argv[1]):
  print("held", flush=True)
  time.sleep(600)
"""


def _holder(workdir: pathlib.Path) -> subprocess.Popen:
  process = subprocess.Popen([sys.executable, "-c", _HOLD, str(workdir)], cwd=REPO,
                             env={**os.environ, "JAX_PLATFORMS": "cpu"}, stdout=subprocess.PIPE,
                             text=True)
  assert process.stdout.readline() == "held\n"
  return process


def _lock(workdir: pathlib.Path) -> pathlib.Path:
  return workdir / workdir_lock.LOCK_NAME


def test_the_lock_names_its_holder_and_goes_when_the_run_ends(tmp_path):
  workdir = tmp_path / "new" / "run"  # created, parents too
  with workdir_lock.held(workdir):
    holder = json.loads(_lock(workdir).read_text())
    assert (holder["host"], holder["pid"]) == (socket.gethostname(), os.getpid())
    assert datetime.datetime.fromisoformat(holder["started"]).tzinfo is not None
  assert not _lock(workdir).exists()
  with pytest.raises(RuntimeError, match="a stage failed"):
    with workdir_lock.held(workdir):
      raise RuntimeError("a stage failed")
  assert not _lock(workdir).exists()


def test_a_second_run_is_refused_naming_the_holder_until_sigterm_releases_it(tmp_path):
  holder = _holder(tmp_path)
  try:
    with pytest.raises(ConfigError) as refused:
      workdir_lock.acquire(tmp_path)
    started = json.loads(_lock(tmp_path).read_text())["started"]
    assert str(refused.value) == (
        f"--workdir={tmp_path} is in use by another run (pid {holder.pid} on "
        f"{socket.gethostname()}, started {started}); allowed: one run per workdir (wait for it "
        f"to end, or remove {_lock(tmp_path)} if it is gone)")
    holder.send_signal(signal.SIGTERM)  # outside a training loop: SIGTERM ends the run at once
    assert holder.wait(timeout=60) == -signal.SIGTERM
  finally:
    holder.kill()
  assert not _lock(tmp_path).exists()
  workdir_lock.acquire(tmp_path).release()


def test_a_lock_left_by_a_killed_run_on_this_host_is_taken_over_with_a_warning(tmp_path):
  holder = _holder(tmp_path)
  holder.kill()
  holder.wait(timeout=60)
  assert json.loads(_lock(tmp_path).read_text())["pid"] == holder.pid  # SIGKILL leaves it
  with pytest.warns(UserWarning, match=rf"took over {_lock(tmp_path)} from pid {holder.pid} on "
                                       rf"\S+, started \S+: that process no longer runs"):
    lock = workdir_lock.acquire(tmp_path)
  assert json.loads(_lock(tmp_path).read_text())["pid"] == os.getpid()
  lock.release()
  assert not _lock(tmp_path).exists()


def test_locks_we_cannot_judge_are_refused_naming_the_file(tmp_path):
  # Another host's pid says nothing here, even one that does not run on this host.
  _lock(tmp_path).write_text(json.dumps(dict(host="elsewhere", pid=2**22 + 1, started="then")))
  with pytest.raises(ConfigError, match=r"in use by another run \(pid 4194305 on elsewhere, "
                                        r"started then\)"):
    workdir_lock.acquire(tmp_path)
  _lock(tmp_path).write_text("not a lock")
  with pytest.raises(ConfigError, match=rf"is locked by {_lock(tmp_path)}, which names no run "
                                        r"\('not a lock'\)"):
    workdir_lock.acquire(tmp_path)


def test_a_take_over_removes_only_the_stale_lock(tmp_path):
  stale = json.dumps(dict(host=socket.gethostname(), pid=1, started="then"))
  fresh = json.dumps(dict(host=socket.gethostname(), pid=os.getpid(), started="now"))
  _lock(tmp_path).write_text(fresh)  # another run took the stale lock over before this one
  workdir_lock._remove_if_unchanged(_lock(tmp_path), stale)
  assert _lock(tmp_path).read_text() == fresh
  _lock(tmp_path).write_text(stale)
  workdir_lock._remove_if_unchanged(_lock(tmp_path), stale)
  assert list(tmp_path.iterdir()) == []
  _lock(tmp_path).write_text(json.dumps(dict(host=socket.gethostname(), pid="1", started="")))
  with pytest.raises(ConfigError, match="which names no run"):
    workdir_lock.acquire(tmp_path)


def test_one_process_of_a_multi_process_run_holds_the_lock(tmp_path, monkeypatch):
  monkeypatch.setattr(distributed, "is_primary", lambda: False)
  monkeypatch.setattr(distributed, "primary_says", lambda flag: True)  # process 0 took it
  with workdir_lock.held(tmp_path):
    assert not _lock(tmp_path).exists()
  monkeypatch.setattr(distributed, "primary_says", lambda flag: False)  # process 0 was refused
  with pytest.raises(ConfigError, match="could not be taken by process 0"):
    with workdir_lock.held(tmp_path):
      pass


# ----------------------------------------------------------------------------- the pipeline


def _config():
  config = default.get_config("family=nemotron")
  config.stages = ("check",)
  return config


def _stage_that_stops(calls: list):
  def stage(ctx, out):
    calls.append(json.loads(_lock(ctx.directory).read_text())["pid"])
    raise preemption.Preempted("stopped")
  return stage


def test_the_pipeline_holds_the_workdir_and_refuses_a_second_run_before_any_stage(
    tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(stages.module("check"), "run", _stage_that_stops(calls))
  with pytest.raises(preemption.Preempted):
    pipeline.run(_config(), tmp_path, log=lambda line: None)
  assert calls == [os.getpid()] and not _lock(tmp_path).exists()  # held, then released

  holder = _holder(tmp_path)
  try:
    with pytest.raises(ConfigError, match=rf"^--workdir={tmp_path} is in use by another run "
                                          rf"\(pid {holder.pid} "):
      pipeline.run(_config(), tmp_path, log=lambda line: None)
  finally:
    holder.kill()
    holder.wait(timeout=60)
  assert calls == [os.getpid()]


def test_a_workdir_that_cannot_be_created_is_one_line_before_any_stage(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(stages.module("check"), "run", _stage_that_stops(calls))
  (tmp_path / "file").write_text("")
  workdir = tmp_path / "file" / "run"
  with pytest.raises(ConfigError) as refused:
    pipeline.run(_config(), workdir)
  assert str(refused.value) == (f"--workdir={workdir} cannot be created ({workdir}: Not a "
                                "directory); allowed: a directory this user can create and write")
  with pytest.raises(ConfigError, match=rf"^--workdir={tmp_path / 'file'} is a file; allowed: "):
    pipeline.run(_config(), tmp_path / "file")
  assert not calls
