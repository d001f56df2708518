r"""Importance + pruning of a 1B-class model (Llama-3.2-1B shapes, random weights) on CPU, timed.

  python experiments/prune_1b_cpu.py --batches=4 --batch_size=2 --seq_len=256
"""

import time

import jax
import numpy as np
from absl import app, flags

from minitron_jax.models import config as config_lib
from minitron_jax.compress import importance, prune
from minitron_jax.inputs import corpus
from minitron_jax.models import model

_BATCHES = flags.DEFINE_integer("batches", 4, "Calibration batches.")
_BATCH = flags.DEFINE_integer("batch_size", 2, "Sequences per batch.")
_SEQ = flags.DEFINE_integer("seq_len", 256, "Tokens per sequence.")


def main(argv):
  del argv
  config = config_lib.preset("llama3_2_1b")
  timings = {}
  started = time.perf_counter()
  params = jax.block_until_ready(model.init(config, 0))
  timings["init"] = time.perf_counter() - started

  batches = corpus.byte_windows(corpus.stdlib_bytes("train"), _BATCH.value, _SEQ.value,
                                _BATCHES.value)
  started = time.perf_counter()
  scores = importance.estimate(config, params, batches, block_sizes=(1, 2), log=print)
  timings["importance"] = time.perf_counter() - started

  target = dict(num_layers=12, hidden_size=1536, num_attention_heads=24, num_key_value_heads=8,
                intermediate_size=6144)
  started = time.perf_counter()
  pruned_config, pruned = prune.prune(config, jax.device_get(params), scores, target)
  timings["prune"] = time.perf_counter() - started

  started = time.perf_counter()
  logits = model.apply(pruned_config, pruned, batches[0])
  assert np.all(np.isfinite(np.asarray(logits)))
  timings["pruned forward"] = time.perf_counter() - started
  tokens = _BATCHES.value * _BATCH.value * _SEQ.value
  print(f"\n{config.num_params():,} -> {pruned_config.num_params():,} parameters; "
        f"{tokens} calibration tokens on {jax.devices()[0].device_kind}")
  for name, seconds in timings.items():
    print(f"| {name} | {seconds:.1f} s |")


if __name__ == "__main__":
  app.run(main)
