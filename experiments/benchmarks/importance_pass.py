r"""The importance pass (every statistic of every axis) against a plain forward pass.

  python experiments/benchmarks/importance_pass.py --hidden=512 --layers=8 --vocab=32768 \
      --batch=4 --seq=512 --batches=4

Both process the same batches; the importance side is `importance.estimate` (device statistics,
host float64 accumulation, Block Importance), the forward side `model.apply` producing logits.
"""

import time

import jax
import numpy as np
from absl import app, flags

from model_flags import BATCH, DTYPE, PRESET, SEQ, model_config  # sibling module
from minitron_jax import benchmark, importance, model

_BATCHES = flags.DEFINE_integer("batches", 4, "Batches timed.")


def main(argv):
  del argv
  config = model_config()
  params = model.init(config, 0)
  rng = np.random.default_rng(0)
  batches = [rng.integers(0, config.vocab_size, (BATCH.value, SEQ.value)).astype(np.int32)
             for _ in range(_BATCHES.value)]
  importance.estimate(config, params, batches[:1])  # compile
  jax.block_until_ready(model.apply(config, params, batches[0]))

  def timed(fn):
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started

  estimate = min(timed(lambda: importance.estimate(config, params, batches)) for _ in range(2))
  forward = min(timed(lambda: [jax.block_until_ready(model.apply(config, params, b))
                               for b in batches]) for _ in range(2))
  tokens = _BATCHES.value * BATCH.value * SEQ.value
  row = (f"{config.num_params() / 1e6:,.0f}M",
         f"{_BATCHES.value} x {BATCH.value}x{SEQ.value}",
         DTYPE.value, f"{tokens / forward:,.0f}", f"{tokens / estimate:,.0f}",
         f"{estimate / forward:.2f}")
  print(benchmark.append_to_log(
      f"Importance pass vs forward ({PRESET.value} model)",
      ["params", "batches", "dtype", "forward tokens/s", "importance tokens/s",
       "importance time / forward time"], [row],
      "`python experiments/benchmarks/importance_pass.py`; target: ratio <= 1.15."))


if __name__ == "__main__":
  app.run(main)
