"""The distillation train step and loop: frozen teacher, fused path, accumulation, sharding,
kill-and-resume."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minitron_jax import config as config_lib
from minitron_jax import distill, model, sharding
from minitron_jax.config import ConfigError
from minitron_jax.losses import LossConfig

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import distill_job  # noqa: E402

TEACHER_CONFIG = config_lib.tiny("qwen2", num_layers=3)
STUDENT_CONFIG = TEACHER_CONFIG.replace(num_layers=2, hidden_size=48, intermediate_size=64)


def _models():
  return model.init(TEACHER_CONFIG, 0), model.init(STUDENT_CONFIG, 1)


def _device_batch(batch):
  return {k: jnp.asarray(v) for k, v in batch.items()}


def _distiller(loss_config=LossConfig(), steps=10, **optimizer):
  return distill.Distiller(STUDENT_CONFIG, TEACHER_CONFIG, loss_config,
                           distill.OptimizerConfig(**{"warmup_steps": 2, **optimizer}), steps)


@pytest.mark.parametrize("loss_config", [
    LossConfig(),
    LossConfig(hidden_loss="cosine", hidden_pairs=((-2, -2), (-1, -1)), embedding_term=True),
    LossConfig(temperature=2.0, ce_weight=0.5),
], ids=["logits", "logits+hidden", "tau2+ce"])
def test_fused_and_unfused_logit_paths_agree(loss_config):
  teacher, student = _models()
  batch = _device_batch(distill_job.batches(1, 0)[0])
  fused = _distiller(loss_config)
  unfused = _distiller(LossConfig(**{**loss_config.__dict__, "fused": False}))
  state = fused.init_state(student)

  def value_and_grad(distiller):
    return jax.value_and_grad(distiller.loss_terms, has_aux=True)(state["trainable"], teacher, batch)

  (loss_f, metrics_f), grads_f = value_and_grad(fused)
  (loss_u, _), grads_u = value_and_grad(unfused)
  np.testing.assert_allclose(loss_f, loss_u, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
               grads_f, grads_u)
  if loss_config.hidden_loss != "none":
    assert metrics_f["alpha"] > 0 and "projection" in grads_f


def test_teacher_is_frozen_and_outside_the_state():
  teacher, student = _models()
  teacher_copy = jax.tree.map(np.array, teacher)
  student_copy = jax.tree.map(np.array, student)
  distiller = _distiller(LossConfig(hidden_loss="mse"))
  state = distiller.init_state(student)
  assert set(state["trainable"]) == {"student", "projection"}
  for batch in distill_job.batches(3, 0):
    state, metrics = distiller.train_step(state, teacher, _device_batch(batch))
  assert int(state["step"]) == 3
  jax.tree.map(np.testing.assert_array_equal, teacher, teacher_copy)
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                       state["trainable"]["student"], student_copy)
  assert max(jax.tree.leaves(moved)) > 0


def test_gradient_accumulation_equals_one_big_batch():
  teacher, student = _models()
  batch = _device_batch(distill_job.batches(1, 0)[0])
  results = []
  for accumulation in (1, 2, 4):
    distiller = _distiller(accumulation_steps=accumulation)
    own = jax.tree.map(jnp.copy, student)  # train_step donates the state's buffers
    state, metrics = distiller.train_step(distiller.init_state(own), teacher, batch)
    results.append((float(metrics["loss"]), state["trainable"]["student"]))
  for loss, params in results[1:]:
    assert loss == pytest.approx(results[0][0], rel=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 params, results[0][1])


def test_bfloat16_and_remat_step_runs_and_learns():
  teacher, student = _models()
  distiller = distill.Distiller(
      STUDENT_CONFIG.replace(dtype="bfloat16", remat="full"),
      TEACHER_CONFIG.replace(dtype="bfloat16"), LossConfig(),
      distill.OptimizerConfig(peak_lr=1e-2, warmup_steps=1), 8)
  state = distiller.init_state(student)
  batch = _device_batch(distill_job.batches(1, 0)[0])
  first = None
  for _ in range(8):
    state, metrics = distiller.train_step(state, teacher, batch)
    first = first if first is not None else float(metrics["loss"])
  assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) < first


def test_sharded_steps_match_one_device():
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices")
  teacher, student = _models()
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
  batches = distill_job.batches(3, 0)
  distiller = _distiller(LossConfig(hidden_loss="cosine"))

  def run(teacher, student, place):
    state = distiller.init_state(jax.tree.map(jnp.copy, student))
    losses = []
    for batch in batches:
      state, metrics = distiller.train_step(state, teacher, place(batch))
      losses.append(float(metrics["loss"]))
    return losses, state

  reference, _ = run(teacher, student, _device_batch)
  sharded_teacher = sharding.shard_params(TEACHER_CONFIG, teacher, mesh)
  sharded_student = sharding.shard_params(STUDENT_CONFIG, student, mesh)
  losses, state = run(sharded_teacher, sharded_student, lambda b: {
      k: jax.device_put(v, sharding.batch_sharding(mesh, v.shape)) for k, v in b.items()})
  np.testing.assert_allclose(losses, reference, rtol=1e-5)
  q_proj = state["trainable"]["student"]["layers"]["attn"]["q_proj"]
  assert len(q_proj.sharding.device_set) == 8


def test_killed_run_resumes_and_reproduces_the_loss_curve(tmp_path):
  steps = 12
  env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
  command = [sys.executable, str(HERE / "distill_job.py")]
  subprocess.run(command + [str(tmp_path / "straight"), str(steps), "0"], env=env, check=True,
                 capture_output=True, timeout=600)

  killed = tmp_path / "killed"
  process = subprocess.Popen(command + [str(killed), str(steps), "0.4"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  deadline = time.time() + 300
  while time.time() < deadline:
    saved = [int(p.name) for p in (killed / "checkpoints").glob("*") if p.name.isdigit()] if (
        killed / "checkpoints").exists() else []
    if saved and max(saved) >= 4:
      break
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  process.wait()
  records = [json.loads(l) for l in (killed / "metrics.jsonl").read_text().splitlines()]
  assert records and records[-1]["step"] < steps, "the run finished before it was killed"

  resumed = subprocess.run(command + [str(killed), str(steps), "0"], env=env, check=True,
                           capture_output=True, text=True, timeout=600)
  assert "resumed from step" in resumed.stdout

  def curve(directory):
    lines = (directory / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}

  straight, again = curve(tmp_path / "straight"), curve(killed)
  assert sorted(again) == list(range(1, steps + 1))
  np.testing.assert_allclose([again[s] for s in range(1, steps + 1)],
                             [straight[s] for s in range(1, steps + 1)], rtol=1e-6)
  assert (killed / "tensorboard").is_dir() and any((killed / "tensorboard").iterdir())


def test_bad_settings_are_one_line_errors():
  with pytest.raises(ConfigError, match="accumulation_steps=0 must be at least 1"):
    distill.OptimizerConfig(accumulation_steps=0)
  with pytest.raises(ConfigError, match="hidden pair index 7 is outside"):
    _distiller(LossConfig(hidden_loss="cosine", hidden_pairs=((7, 1),)))
  with pytest.raises(ConfigError, match="no teacher was given"):
    distill.Distiller(STUDENT_CONFIG, None, LossConfig(), distill.OptimizerConfig(), 1)
