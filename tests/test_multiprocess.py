"""Two processes x 4 CPU devices (gloo collectives) compute what one process with 8 devices does."""

import hashlib
import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from minitron_jax.core import distributed
from minitron_jax.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The tiny default on every stage that computes across processes, shortened.
OVERRIDES = {
    "stages": ("importance", "search", "prune", "distill", "evaluate", "report"),
    "search.max_candidates": 1,
    "search.retrain_steps": 2,
    "search.eval_steps": (2,),
    "distill.steps": 4,
    "distill.eval_every": 4,
    "distill.checkpoint_every": 2,
    "importance.drop_loss": False,
}


# Only the offline teacher's store, and a distillation that reads it.
OFFLINE_OVERRIDES = {
    "stages": ("teacher_logits", "importance", "prune", "distill"),
    "importance.drop_loss": False,
    "distill.steps": 4,
    "distill.eval_every": 4,
    "distill.checkpoint_every": 4,
    "teacher_logits.rows_per_shard": 3,  # several shards, split over the processes
}


def _config(overrides=OVERRIDES):
  sys.path.insert(0, str(ROOT))
  from configs import default

  config = default.get_config("runlocal")
  for key, value in overrides.items():
    *parents, last = key.split(".")
    section = config
    for name in parents:
      section = section[name]
    section[last] = value
  return config


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _xla_flags(devices: int) -> str:
  """This process's XLA flags (the optimisation level conftest.py sets included: the processes
  must compile what this one does) with `devices` simulated CPU devices."""
  kept = [flag for flag in os.environ.get("XLA_FLAGS", "").split()
          if not flag.startswith("--xla_force_host_platform_device_count")]
  return " ".join(kept + [f"--xla_force_host_platform_device_count={devices}"])


def _launch(workdir: pathlib.Path, num_processes: int, devices_per_process: int,
            overrides=OVERRIDES):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": _xla_flags(devices_per_process)}
  port = _free_port()
  command = [sys.executable, "-u", "-m", "minitron_jax.main", "--config=configs/default.py:runlocal",
             f"--workdir={workdir}", *(f"--config.{k}={v!r}" for k, v in overrides.items())]
  if num_processes > 1:
    command += [f"--coordinator_address=localhost:{port}", f"--num_processes={num_processes}"]
  processes = [subprocess.Popen(command + ([f"--process_id={i}"] if num_processes > 1 else []),
                                cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
               for i in range(num_processes)]
  outputs = []
  try:
    for process in processes:
      outputs.append(process.communicate(timeout=600)[0])
  finally:
    for process in processes:
      process.kill()
  for i, process in enumerate(processes):
    assert process.returncode == 0, f"process {i}:\n{outputs[i][-3000:]}"
  return outputs


def _stage_lines(output: str) -> list[str]:
  return [line for line in output.splitlines()
          if line.startswith("[") and not line.startswith("[Gloo]")]


def test_two_processes_equal_one_process_with_eight_devices(tmp_path):
  from minitron_jax.checkpoints import checkpoint, hf
  from minitron_jax.compress import importance
  from minitron_jax.run import pipeline

  outputs = _launch(tmp_path / "two", num_processes=2, devices_per_process=4)
  # This process: 8 devices, for the numbers. The harness and the completions run on the two
  # processes only (checked below to have run), not again here.
  pipeline.run(_config({**OVERRIDES, "evaluate.lm_eval.own_tasks": "", "evaluate.prompts": ()}),
               tmp_path / "one", log=lambda line: None)

  one, two = tmp_path / "one", tmp_path / "two"
  # Only the primary process reports progress.
  assert any(l.startswith("[distill] step 4/4") for l in _stage_lines(outputs[0]))
  assert _stage_lines(outputs[1]) == []

  scores = [importance.Scores.load(d / "importance") for d in (one, two)]
  assert scores[0].num_tokens == scores[1].num_tokens
  for name in scores[0].stats:
    np.testing.assert_allclose(scores[1].stats[name], scores[0].stats[name], rtol=1e-5,
                               atol=1e-6, err_msg=name)
  np.testing.assert_allclose(scores[1].block_importance[1], scores[0].block_importance[1],
                             rtol=1e-5, atol=1e-7)

  searched = [json.loads((d / "search" / "result.json").read_text()) for d in (one, two)]
  assert searched[0]["best"] == searched[1]["best"]

  for stage in ("prune", "distill"):
    (config_one, params_one), (config_two, params_two) = (
        checkpoint.load_model(d / stage / "model") for d in (one, two))
    assert config_one == config_two
    flat_one = dict(_flatten(params_one))
    for path, value in _flatten(params_two):
      np.testing.assert_allclose(value, flat_one[path], rtol=1e-5, atol=1e-6,
                                 err_msg=f"{stage} {path}")
    assert hf.load(two / stage / "hf")[0] == config_two

  _assert_same_distill_curves(one, two)

  evaluated = [json.loads((d / "evaluate" / "metrics.json").read_text()) for d in (one, two)]
  assert evaluated[1]["distilled"]["val_loss"] == pytest.approx(
      evaluated[0]["distilled"]["val_loss"], rel=1e-5)
  assert (two / "report.md").is_file()
  harness = (two / "evaluate" / "lm_eval.md").read_text()
  assert "next_line/acc" in harness and "distilled" in harness
  completions = json.loads((two / "evaluate" / "completions.json").read_text())["completions"]
  assert {"teacher", "pruned", "distilled"} <= set(completions)
  assert not list(two.rglob(".*.tmp-*")), "a staging directory was left behind"


def test_two_processes_write_the_teacher_store_one_process_writes(tmp_path):
  from minitron_jax.run import pipeline

  _launch(tmp_path / "two", num_processes=2, devices_per_process=4,
          overrides=OFFLINE_OVERRIDES)
  pipeline.run(_config(OFFLINE_OVERRIDES), tmp_path / "one", log=lambda line: None)

  for split in ("train", "validation"):
    one, two = (tmp_path / d / "teacher_logits" / split for d in ("one", "two"))
    files = sorted(path.name for path in one.iterdir())
    assert len([name for name in files if name.startswith("shard-")]) > 1
    assert sorted(path.name for path in two.iterdir()) == files
    for name in files:  # the shards, and metadata.json with the stream's hash
      digests = [hashlib.sha256((d / name).read_bytes()).hexdigest() for d in (one, two)]
      assert digests[1] == digests[0], f"{split}/{name} differs"
  _assert_same_distill_curves(tmp_path / "one", tmp_path / "two")


def _assert_same_distill_curves(one: pathlib.Path, two: pathlib.Path) -> None:
  curves = [[json.loads(l) for l in (d / "distill" / "metrics.jsonl").read_text().splitlines()]
            for d in (one, two)]
  assert [r["step"] for r in curves[1]] == [r["step"] for r in curves[0]]
  for a, b in zip(curves[0], curves[1]):
    for key in a:
      assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)


def _flatten(tree, prefix=()):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _flatten(value, prefix + (key,))
    else:
      yield "/".join(prefix + (key,)), np.asarray(value)


@pytest.mark.parametrize("arguments, message", [
    (("localhost:1234", None, None), "go together"),
    (("localhost:1234", 2, 2), "--process_id=2 must be in [0, 2)"),
    (("localhost", 2, 0), "must be host:port"),
    (("localhost:1234", 0, 0), "--num_processes=0 must be at least 1"),
])
def test_bad_distributed_flags_are_one_line_errors(arguments, message):
  with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
    distributed.initialize(*arguments)


def test_a_lone_process_initialises_nothing(monkeypatch):
  for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(name, raising=False)
  assert not distributed.cluster_detected()
  assert distributed.initialize() is False
  monkeypatch.setenv("SLURM_NTASKS", "1")
  assert not distributed.cluster_detected()
  monkeypatch.setenv("SLURM_NTASKS", "4")
  assert distributed.cluster_detected()
  monkeypatch.delenv("SLURM_NTASKS")
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1k-0,t1k-1")
  assert distributed.cluster_detected()


_SIGNAL_ONE_PROCESS = """
import os, signal, sys
from minitron_jax.core import distributed, preemption
distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
with preemption.watch():
  if distributed.jax.process_index() == 1:
    os.kill(os.getpid(), signal.SIGTERM)
  print("local", preemption.requested(), "anywhere", preemption.requested_anywhere(), flush=True)
"""


def test_sigterm_on_one_process_stops_every_process():
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  address = f"localhost:{_free_port()}"
  processes = [subprocess.Popen([sys.executable, "-c", _SIGNAL_ONE_PROCESS, address, str(i)],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True) for i in range(2)]
  try:
    outputs = [p.communicate(timeout=120)[0] for p in processes]
  finally:
    for p in processes:
      p.kill()
  assert "local False anywhere True" in outputs[0]
  assert "local True anywhere True" in outputs[1]


def test_two_processes_each_read_and_hold_only_their_half_of_an_fsdp_model(tmp_path):
  """Loading by slices and pruning on the mesh (the prune stage and every search candidate):
  on fsdp=8 over 2 processes x 4 devices each process reads and holds about half the model,
  never a whole-model array, and the pruned models equal one process's."""
  sys.path.insert(0, str(ROOT / "tests"))
  import sharded_job
  from minitron_jax.checkpoints import hf
  from minitron_jax.compress import importance
  from minitron_jax.models import config as config_lib, model

  config = config_lib.tiny("llama", num_layers=2, hidden_size=64, num_attention_heads=8,
                           num_key_value_heads=4, head_dim=16, intermediate_size=128)
  params = model.init(config, 0)
  hf.save(tmp_path / "model", config, params)
  batches = [np.random.RandomState(i).randint(0, 256, (4, 16)) for i in range(2)]
  importance.estimate(config, params, batches).save(tmp_path / "scores")

  one, two = tmp_path / "one", tmp_path / "two"
  one.mkdir(), two.mkdir()
  sharded_job.run(tmp_path / "model", tmp_path / "scores", one)  # this process: 8 devices
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": _xla_flags(4)}
  port = _free_port()
  processes = [subprocess.Popen(
      [sys.executable, "tests/sharded_job.py", str(tmp_path / "model"), str(tmp_path / "scores"),
       str(two), f"localhost:{port}", "2", str(i)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = [process.communicate(timeout=300)[0] for process in processes]
  for process, output in zip(processes, outputs):
    assert process.returncode == 0, output[-3000:]

  whole = json.loads((one / "process_0.json").read_text())
  assert whole["loaded"][0] == whole["loaded"][1]  # one process holds it all
  for index in range(2):
    report = json.loads((two / f"process_{index}.json").read_text())
    # Each weight is split over the 8 devices (norms whole, a few KiB): half, plus the norms.
    assert report["read"] <= 0.55 * report["file_bytes"], report
    for key in ("loaded", *sharded_job.TARGETS):
      mine, total = report[key]
      assert mine <= 0.55 * total, (key, report)
  for name in sharded_job.TARGETS:
    assert (two / f"{name}.json").read_text() == (one / f"{name}.json").read_text()
    got, want = np.load(two / f"{name}.npz"), np.load(one / f"{name}.npz")
    assert sorted(got.files) == sorted(want.files)
    for key in want.files:
      np.testing.assert_array_equal(got[key], want[key], err_msg=f"{name} {key}")
