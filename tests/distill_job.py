"""A tiny distillation run as its own process, for the kill-and-resume and SIGTERM tests.

  python tests/distill_job.py WORKDIR STEPS SECONDS_PER_BATCH

After SIGTERM it exits as the main job does: one line, status preemption.EXIT_CODE.
"""

import sys
import time

import grain
import numpy as np

from minitron_jax.models import config as config_lib
from minitron_jax.core import preemption
from minitron_jax.models import model
from minitron_jax.training import distill, loop
from minitron_jax.objectives.losses import LossConfig


def batches(count: int, seed: int):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(count):
    tokens = rng.integers(0, 256, (4, 16), dtype=np.int32)
    out.append(dict(tokens=tokens, segment_ids=np.ones_like(tokens),
                    positions=np.broadcast_to(np.arange(16, dtype=np.int32), tokens.shape)))
  return out


def main(workdir: str, steps: int, delay: float):
  teacher_config = config_lib.tiny("llama")
  student_config = teacher_config.replace(num_layers=1, intermediate_size=64)
  teacher = model.init(teacher_config, 0)
  student = model.init(student_config, 1)

  def slow(batch):
    time.sleep(delay)  # gives the test time to kill the process between checkpoints
    return batch

  iterator = iter(grain.MapDataset.source(batches(steps, 0)).map(slow).to_iter_dataset())
  distiller = distill.Distiller(
      student_config, teacher_config, LossConfig(hidden_loss="cosine"),
      distill.OptimizerConfig(peak_lr=1e-2, warmup_steps=2), steps)
  settings = loop.LoopConfig(steps=steps, log_every=1, eval_every=5, checkpoint_every=2)
  try:
    loop.train(distiller, student, teacher, iterator, batches(2, 1), settings, workdir,
               log=lambda line: print(line, flush=True))
  except preemption.Preempted as stopped:
    print(f"preempted: {stopped}", flush=True)
    sys.exit(preemption.EXIT_CODE)


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))
