r"""Distillation step throughput and MFU for a teacher/student pair.

  python experiments/benchmarks/distill_step.py --preset=tiny --hidden=512 --layers=8 \
      --vocab=32768 --batch=4 --seq=512 --dtype=float32
  python experiments/benchmarks/distill_step.py --preset=llama3_2_1b --batch=8 --seq=2048 \
      --dtype=bfloat16 --remat=dots        # a 1B teacher -> ~0.5B student, on a GPU

The student is the teacher with half the layers and half the MLP (random weights: speed does not
depend on them). MFU = (teacher forward + student forward/backward model FLOPs) / step time /
the measured matmul peak of the same dtype on this device. `student_of`, `batch_of` and
`Step` are what gpu_suite.py imports.
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from minitron_jax.models import flops, model
from minitron_jax.tools import benchmark
from minitron_jax.training import distill
from minitron_jax.objectives.losses import LossConfig

# Flags only when run as a script: gpu_suite.py imports this module beside others whose flag
# names overlap.
if __name__ == "__main__":
  from model_flags import BATCH, DTYPE, PRESET, SEQ, model_config  # sibling module

  _REMAT = flags.DEFINE_enum("remat", "none", ["none", "full", "dots"], "Student remat policy.")
  _STEPS = flags.DEFINE_integer("steps", 5, "Timed steps.")


def student_of(teacher_cfg, remat: str = "none"):
  """The teacher with half its layers and half its MLP: a ~0.5B student of a 1B teacher."""
  return teacher_cfg.replace(num_layers=teacher_cfg.num_layers // 2,
                             intermediate_size=teacher_cfg.intermediate_size // 2, remat=remat)


def batch_of(vocab_size: int, batch: int, seq: int) -> dict:
  """Random tokens, one sequence per row."""
  tokens = np.random.default_rng(0).integers(0, vocab_size, (batch, seq))
  return {"tokens": jnp.asarray(tokens, jnp.int32),
          "segment_ids": jnp.ones(tokens.shape, jnp.int32),
          "positions": jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), tokens.shape)}


class Step:
  """One distillation train step (the default loss, AdamW) compiled for a batch shape; calling it
  runs a step on the state it holds (the state is donated, as in training)."""

  def __init__(self, teacher_cfg, student_cfg, teacher_params, batch: dict, total_steps: int):
    self.teacher_params, self.batch = teacher_params, batch
    self.distiller = distill.Distiller(student_cfg, teacher_cfg, LossConfig(),
                                       distill.OptimizerConfig(), total_steps)
    self.state = self.distiller.init_state(model.init(student_cfg, 1))
    self.compiled = self.distiller.train_step.lower(self.state, teacher_params, batch).compile()

  def memory_bytes(self) -> int:
    """XLA's estimate of the step's peak: arguments + outputs - donated + temporaries."""
    m = self.compiled.memory_analysis()
    return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            + m.temp_size_in_bytes)

  def __call__(self):
    self.state, metrics = self.compiled(self.state, self.teacher_params, self.batch)
    return metrics["loss"]


def main(argv):
  del argv
  teacher_cfg = model_config()
  student_cfg = student_of(teacher_cfg, _REMAT.value)
  teacher = model.init(teacher_cfg, 0)
  step = Step(teacher_cfg, student_cfg, teacher, batch_of(teacher_cfg.vocab_size, BATCH.value,
                                                          SEQ.value), _STEPS.value + 1)
  seconds = benchmark.seconds_per_call(step, repeats=_STEPS.value, warmup=1)
  tokens_per_step = BATCH.value * SEQ.value
  per_token = flops.distillation_flops_per_token(student_cfg, teacher_cfg, SEQ.value)
  achieved = per_token * tokens_per_step / seconds
  peak = benchmark.matmul_peak_flops(jnp.dtype(DTYPE.value))
  row = (f"{teacher_cfg.num_params() / 1e6:,.0f}M -> {student_cfg.num_params() / 1e6:,.0f}M",
         f"{BATCH.value}x{SEQ.value}", DTYPE.value, _REMAT.value,
         f"{seconds * 1e3:,.0f}",
         f"{tokens_per_step / seconds:,.0f}", f"{per_token / 1e9:.2f}",
         f"{achieved / 1e12:.3f}", f"{peak / 1e12:.3f}", f"{achieved / peak:.1%}")
  print(benchmark.append_to_log(
      f"Distillation step ({PRESET.value} teacher)",
      ["teacher -> student params", "batch", "dtype", "remat", "ms/step", "tokens/s",
       "GFLOP/token", "achieved TFLOP/s", "matmul peak TFLOP/s", "MFU"], [row],
      "`python experiments/benchmarks/distill_step.py` with the flags above; fused logit KLD, "
      "AdamW; FLOPs: teacher forward + 3x student forward (see minitron_jax/models/flops.py)."))


if __name__ == "__main__":
  app.run(main)
