"""The distillation train step and loop: frozen teacher, fused path, accumulation, sharding, a
mixture-of-experts student's router loss, divergence guard, kill-and-resume and
SIGTERM-and-resume."""

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minitron_jax.models import config as config_lib
from minitron_jax.core import preemption
from minitron_jax.models import model, moe, partitioning, sharding
from minitron_jax.training import distill, loop
from minitron_jax.errors import ConfigError
from minitron_jax.objectives.losses import LossConfig

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
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=2, fsdp=2, tensor=2))
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
      k: jax.device_put(v, partitioning.batch_sharding(mesh, v.shape)) for k, v in b.items()})
  np.testing.assert_allclose(losses, reference, rtol=1e-5)
  q_proj = state["trainable"]["student"]["layers"]["attn"]["q_proj"]
  assert len(q_proj.sharding.device_set) == 8


MOE_STUDENT_CONFIG = config_lib.tiny("qwen3_moe")  # the dense teacher's vocabulary


def _padded_batch():
  """distill_job's first batch with the last 5 positions of row 0 padding (segment 0)."""
  batch = {k: np.array(v) for k, v in distill_job.batches(1, 0)[0].items()}
  batch["segment_ids"][0, -5:] = 0
  return _device_batch(batch)


def test_router_load_balancing_loss_of_a_moe_student():
  teacher, student = model.init(TEACHER_CONFIG, 0), model.init(MOE_STUDENT_CONFIG, 1)
  batch = _padded_batch()
  coef = 0.05

  def distiller(coef):
    return distill.Distiller(MOE_STUDENT_CONFIG, TEACHER_CONFIG,
                             LossConfig(router_aux_loss_coef=coef), distill.OptimizerConfig(), 1)

  def value_and_grad(coef):
    trainable = distiller(coef).init_state(student)["trainable"]
    return jax.value_and_grad(distiller(coef).loss_terms, has_aux=True)(trainable, teacher, batch)

  (total, metrics), grads = value_and_grad(coef)
  (total_off, metrics_off), grads_off = value_and_grad(0.0)
  assert "router_aux" not in metrics_off

  def reference_aux(params):
    _, inter = model.apply(MOE_STUDENT_CONFIG, params, batch["tokens"],
                           segment_ids=batch["segment_ids"], positions=batch["positions"],
                           return_intermediates=True)
    return moe.load_balancing_loss(inter["router_logits"], MOE_STUDENT_CONFIG.num_experts_per_tok,
                                   batch["segment_ids"] != 0)

  expected, expected_grads = jax.value_and_grad(reference_aux)(student)
  np.testing.assert_allclose(metrics["router_aux"], expected, rtol=1e-6)
  np.testing.assert_allclose(metrics["logit_loss"], metrics_off["logit_loss"], rtol=1e-6)
  np.testing.assert_allclose(total, total_off + coef * metrics["router_aux"], rtol=1e-6)
  # The router's gradient changes by exactly coef x the load-balancing loss's own gradient.
  router = [g["student"]["layers"]["moe"]["router"] for g in (grads, grads_off)]
  change = router[0] - router[1]
  assert float(jnp.max(jnp.abs(change))) > 1e-6
  np.testing.assert_allclose(change, coef * expected_grads["layers"]["moe"]["router"],
                             rtol=1e-3, atol=1e-7)
  validation = distiller(coef).evaluate({"student": student}, teacher, [batch])
  assert validation["val_router_aux"] == pytest.approx(float(expected), rel=1e-6)


def test_router_loss_needs_a_moe_student():
  with pytest.raises(ConfigError) as caught:
    distill.Distiller(STUDENT_CONFIG, TEACHER_CONFIG, LossConfig(router_aux_loss_coef=0.01),
                      distill.OptimizerConfig(), 1)
  assert str(caught.value) == ("router_aux_loss_coef=0.01 needs a mixture-of-experts student; "
                               "this one (qwen2) is dense; allowed: 0.0")


def test_a_non_finite_step_leaves_the_state_untouched():
  teacher, student = _models()
  poisoned = jax.tree.map(lambda w: jnp.full_like(w, jnp.nan), teacher)
  distiller = distill.Distiller(STUDENT_CONFIG, TEACHER_CONFIG, LossConfig(),
                                distill.OptimizerConfig(warmup_steps=2), 10, skip_non_finite=True)
  state = distiller.init_state(student)
  before = jax.tree.map(np.array, {k: state[k] for k in ("trainable", "opt_state")})
  batch = _device_batch(distill_job.batches(1, 0)[0])
  state, metrics = distiller.train_step(state, poisoned, batch)
  assert not np.isfinite(float(metrics["loss"])) and int(state["step"]) == 1
  jax.tree.map(np.testing.assert_array_equal, {k: state[k] for k in before}, before)


def _loop_with_a_bad_step(tmp_path, bad_step, **settings):
  """loop.train on distill_job's data where step `bad_step` sees a NaN teacher."""
  teacher, student = _models()
  poisoned = jax.tree.map(lambda w: jnp.full_like(w, jnp.nan), teacher)
  distiller = distill.Distiller(STUDENT_CONFIG, TEACHER_CONFIG, LossConfig(),
                                distill.OptimizerConfig(warmup_steps=2), 6,
                                skip_non_finite=bool(settings.get("max_bad_steps")))
  step_fn, calls = distiller.train_step, []

  def train_step(state, teacher_params, batch):
    calls.append(None)
    return step_fn(state, poisoned if len(calls) == bad_step else teacher_params, batch)

  distiller.train_step = train_step
  iterator = iter(grain.MapDataset.source(distill_job.batches(6, 0)).to_iter_dataset())
  lines = []
  result = loop.train(distiller, student, teacher, iterator, distill_job.batches(1, 1),
                      loop.LoopConfig(steps=6, log_every=1, eval_every=6, checkpoint_every=2,
                                      **settings),
                      tmp_path, log=lines.append)
  return result, lines


def test_divergence_stops_before_the_bad_state_is_saved(tmp_path):
  with pytest.raises(loop.Diverged) as caught:
    _loop_with_a_bad_step(tmp_path, bad_step=3)
  message = str(caught.value)
  assert "\n" not in message and message.startswith("[distill] diverged at step 3 (loss nan")
  assert f"last good checkpoint {tmp_path / 'checkpoints' / '2'} (step 2)" in message
  assert max(_saved_steps(tmp_path)) == 2


def test_bad_steps_within_the_tolerance_are_skipped_and_reported(tmp_path):
  (_, final), lines = _loop_with_a_bad_step(tmp_path, bad_step=3, max_bad_steps=1)
  assert final["skipped_steps"] == 1 and np.isfinite(final["val_loss"])
  assert any("step 3: loss nan" in line and "update skipped (1 of max_bad_steps=1)" in line
             for line in lines)


def test_a_learning_rate_that_diverges_stops_the_run(tmp_path):
  teacher, student = _models()
  distiller = _distiller(steps=20, peak_lr=1e4, warmup_steps=0)
  iterator = iter(grain.MapDataset.source(distill_job.batches(20, 0)).to_iter_dataset())
  with pytest.raises(loop.Diverged, match=r"diverged at step (\d+)") as caught:
    loop.train(distiller, student, teacher, iterator, distill_job.batches(1, 1),
               loop.LoopConfig(steps=20, log_every=5, eval_every=20, checkpoint_every=2),
               tmp_path, log=lambda line: None)
  bad = int(re.search(r"diverged at step (\d+)", str(caught.value)).group(1))
  assert all(step < bad for step in _saved_steps(tmp_path))


def _train_tiny(directory, steps, log=None):
  teacher, student = _models()
  iterator = iter(grain.MapDataset.source(distill_job.batches(8, 0)).to_iter_dataset())
  return loop.train(_distiller(steps=8), student, teacher, iterator, distill_job.batches(1, 1),
                    loop.LoopConfig(steps=steps, log_every=1, eval_every=8, checkpoint_every=2),
                    directory, log=log or (lambda line: None))


def test_resume_ignores_a_torn_metrics_line_and_a_half_written_checkpoint(tmp_path):
  _train_tiny(tmp_path, 4)
  checkpoints = tmp_path / "checkpoints"
  # A kill mid-write leaves a partial last line, and orbax's temporary directory of a save.
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 5, "loss": 0.')
  shutil.copytree(checkpoints / "4", checkpoints / "6.orbax-checkpoint-tmp-1234567")
  lines = []
  _train_tiny(tmp_path, 6, lines.append)
  assert "[distill] resumed from step 4" in lines
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  steps = [json.loads(line)["step"] for line in lines]
  assert steps == [1, 2, 3, 4, 5, 6]


# orbax leaves a callback for its closed event loop after a failed restore; harmless here.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_damaged_checkpoint_is_one_line_naming_it(tmp_path):
  _train_tiny(tmp_path, 4)
  for file in (tmp_path / "checkpoints" / "4" / "state").rglob("d/*"):
    if file.is_file():
      file.write_bytes(file.read_bytes()[:10])
  with pytest.raises(ConfigError) as caught:
    _train_tiny(tmp_path, 6)
  message = str(caught.value)
  assert "\n" not in message
  assert message.startswith(f"checkpoint {tmp_path / 'checkpoints' / '4'} cannot be restored")


JOB_STEPS = 12
JOB = [sys.executable, str(HERE / "distill_job.py")]
JOB_ENV = {**os.environ, "PYTHONPATH": str(HERE.parent)}


def _curve(directory):
  lines = (directory / "metrics.jsonl").read_text().splitlines()
  return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def _saved_steps(directory):
  checkpoints = directory / "checkpoints"
  return [int(p.name) for p in checkpoints.glob("*") if p.name.isdigit()] if (
      checkpoints.exists()) else []


@pytest.fixture(scope="module")
def straight_curve(tmp_path_factory):
  """The loss curve of an uninterrupted run, for the interrupted ones to reproduce."""
  directory = tmp_path_factory.mktemp("straight")
  subprocess.run(JOB + [str(directory), str(JOB_STEPS), "0"], env=JOB_ENV, check=True,
                 capture_output=True, timeout=600)
  return _curve(directory)


def _resume_and_compare(directory, straight_curve, resume_step=None):
  resumed = subprocess.run(JOB + [str(directory), str(JOB_STEPS), "0"], env=JOB_ENV, check=True,
                           capture_output=True, text=True, timeout=600)
  assert f"resumed from step {resume_step or ''}" in resumed.stdout
  again = _curve(directory)
  assert sorted(again) == list(range(1, JOB_STEPS + 1))
  np.testing.assert_allclose([again[s] for s in range(1, JOB_STEPS + 1)],
                             [straight_curve[s] for s in range(1, JOB_STEPS + 1)], rtol=1e-6)


def test_killed_run_resumes_and_reproduces_the_loss_curve(tmp_path, straight_curve):
  killed = tmp_path / "killed"
  process = subprocess.Popen(JOB + [str(killed), str(JOB_STEPS), "0.4"], env=JOB_ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  deadline = time.time() + 300
  while time.time() < deadline:
    saved = _saved_steps(killed)
    if saved and max(saved) >= 4:
      break
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  process.wait()
  records = [json.loads(l) for l in (killed / "metrics.jsonl").read_text().splitlines()]
  assert records and records[-1]["step"] < JOB_STEPS, "the run finished before it was killed"
  _resume_and_compare(killed, straight_curve)
  assert (killed / "tensorboard").is_dir() and any((killed / "tensorboard").iterdir())


def test_sigterm_saves_at_the_next_step_and_the_rerun_reproduces_the_loss_curve(
    tmp_path, straight_curve):
  stopped = tmp_path / "stopped"
  process = subprocess.Popen(JOB + [str(stopped), str(JOB_STEPS), "0.4"], env=JOB_ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 300
  while time.time() < deadline and len(_curve(stopped) if (stopped / "metrics.jsonl").exists()
                                           else ()) < 3:
    time.sleep(0.05)
  process.send_signal(signal.SIGTERM)
  output, _ = process.communicate(timeout=300)
  assert process.returncode == preemption.EXIT_CODE, output
  lines = [line for line in output.splitlines() if line.startswith("preempted:")]
  assert len(lines) == 1 and "stopped by SIGTERM after step" in lines[0], output
  step = int(re.search(r"after step (\d+)/", lines[0]).group(1))
  assert 3 <= step < JOB_STEPS
  # Saved at the step it stopped after, not only at the last periodic checkpoint.
  assert max(_saved_steps(stopped)) == step == max(_curve(stopped))
  _resume_and_compare(stopped, straight_curve, resume_step=step)


def test_bad_settings_are_one_line_errors():
  with pytest.raises(ConfigError, match="accumulation_steps=0 must be at least 1"):
    distill.OptimizerConfig(accumulation_steps=0)
  with pytest.raises(ConfigError, match="hidden pair index 7 is outside"):
    _distiller(LossConfig(hidden_loss="cosine", hidden_pairs=((7, 1),)))
  with pytest.raises(ConfigError, match="no teacher was given"):
    distill.Distiller(STUDENT_CONFIG, None, LossConfig(), distill.OptimizerConfig(), 1)
  with pytest.raises(ConfigError, match=r"eval steps \[9\] are outside the run's steps 1..8"):
    loop.LoopConfig(steps=8, eval_steps=(9,))
  with pytest.raises(ConfigError, match="max_bad_steps=1 needs a Distiller with skip_non_finite"):
    loop.train(_distiller(), None, None, iter(()), [],
               loop.LoopConfig(steps=1, max_bad_steps=1), "/nonexistent")
