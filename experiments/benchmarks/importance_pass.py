r"""The importance pass (every statistic of every axis) against a plain forward pass.

  python experiments/benchmarks/importance_pass.py --hidden=512 --layers=8 --vocab=32768 \
      --batch=4 --seq=512 --batches=4

Both process the same batches; the importance side is `importance.estimate` (device statistics,
host float64 accumulation, Block Importance), the forward side `model.apply` producing logits.
`measure` is what gpu_suite.py imports.
"""

import time

import jax
import numpy as np
from absl import app, flags

from minitron_jax.compress import importance
from minitron_jax.models import model
from minitron_jax.tools import benchmark

# Flags only when run as a script: gpu_suite.py imports this module beside others whose flag
# names overlap.
if __name__ == "__main__":
  from model_flags import BATCH, DTYPE, PRESET, SEQ, model_config  # sibling module

  _BATCHES = flags.DEFINE_integer("batches", 4, "Batches timed.")


def measure(config, batch: int, seq: int, num_batches: int, params=None) -> dict:
  """Seconds of the importance pass and of plain forwards over the same random batches (the
  faster of two runs each, after one compiling call)."""
  params = model.init(config, 0) if params is None else params
  rng = np.random.default_rng(0)
  batches = [rng.integers(0, config.vocab_size, (batch, seq)).astype(np.int32)
             for _ in range(num_batches)]
  importance.estimate(config, params, batches[:1])  # compile
  jax.block_until_ready(model.apply(config, params, batches[0]))

  def timed(fn):
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started

  estimate = min(timed(lambda: importance.estimate(config, params, batches)) for _ in range(2))
  forward = min(timed(lambda: [jax.block_until_ready(model.apply(config, params, b))
                               for b in batches]) for _ in range(2))
  return {"importance_seconds": estimate, "forward_seconds": forward,
          "ratio": estimate / forward, "tokens": num_batches * batch * seq}


def main(argv):
  del argv
  config = model_config()
  m = measure(config, BATCH.value, SEQ.value, _BATCHES.value)
  row = (f"{config.num_params() / 1e6:,.0f}M",
         f"{_BATCHES.value} x {BATCH.value}x{SEQ.value}",
         DTYPE.value, f"{m['tokens'] / m['forward_seconds']:,.0f}",
         f"{m['tokens'] / m['importance_seconds']:,.0f}", f"{m['ratio']:.2f}")
  print(benchmark.append_to_log(
      f"Importance pass vs forward ({PRESET.value} model)",
      ["params", "batches", "dtype", "forward tokens/s", "importance tokens/s",
       "importance time / forward time"], [row],
      "`python experiments/benchmarks/importance_pass.py`; target: ratio <= 1.15."))


if __name__ == "__main__":
  app.run(main)
