r"""Distillation step throughput and MFU for a teacher/student pair.

  python experiments/benchmarks/distill_step.py --preset=tiny --hidden=512 --layers=8 \
      --vocab=32768 --batch=4 --seq=512 --dtype=float32
  python experiments/benchmarks/distill_step.py --preset=llama3_2_1b --batch=8 --seq=2048 \
      --dtype=bfloat16 --remat=dots        # a 1B teacher -> ~0.5B student, on a GPU

The student is the teacher with half the layers and half the MLP (random weights: speed does not
depend on them). MFU = (teacher forward + student forward/backward model FLOPs) / step time /
the measured matmul peak of the same dtype on this device.
"""

import jax.numpy as jnp
import numpy as np
from absl import app, flags

from model_flags import BATCH, DTYPE, PRESET, SEQ, model_config  # sibling module
from minitron_jax import benchmark, distill, flops, model
from minitron_jax.losses import LossConfig

_REMAT = flags.DEFINE_enum("remat", "none", ["none", "full", "dots"], "Student remat policy.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps.")


def main(argv):
  del argv
  teacher_cfg = model_config()
  student_cfg = teacher_cfg.replace(num_layers=teacher_cfg.num_layers // 2,
                                    intermediate_size=teacher_cfg.intermediate_size // 2,
                                    remat=_REMAT.value)
  teacher = model.init(teacher_cfg, 0)
  student = model.init(student_cfg, 1)
  distiller = distill.Distiller(student_cfg, teacher_cfg, LossConfig(),
                                distill.OptimizerConfig(), _STEPS.value + 1)
  state = distiller.init_state(student)
  tokens = np.random.default_rng(0).integers(0, teacher_cfg.vocab_size,
                                             (BATCH.value, SEQ.value))
  batch = {"tokens": jnp.asarray(tokens, jnp.int32),
           "segment_ids": jnp.ones(tokens.shape, jnp.int32),
           "positions": jnp.broadcast_to(jnp.arange(SEQ.value, dtype=jnp.int32),
                                         tokens.shape)}

  holder = {"state": state}

  def step():
    holder["state"], metrics = distiller.train_step(holder["state"], teacher, batch)
    return metrics["loss"]

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
      "AdamW; FLOPs: teacher forward + 3x student forward (see minitron_jax/flops.py)."))


if __name__ == "__main__":
  app.run(main)
