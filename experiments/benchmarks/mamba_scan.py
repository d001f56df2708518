r"""Mamba-2's chunked scan (ssd.ssd_chunked) against the token-by-token recurrence
(ssd.ssd_sequential): the time of a forward + backward and XLA's compiled temporary memory, at
one Nemotron-H-8B mixer's head shapes scaled to a CPU (heads and batch below).

  python experiments/benchmarks/mamba_scan.py --seqs=2048,8192

Shapes: batch 1, --heads heads of head_dim 64 in --groups groups, state 128, chunk 128 (the
8B's mixer has 128 heads in 8 groups); packed rows of random document lengths. Both forms
compute the same function (tests/test_mamba2.py); this measures only their cost.
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from minitron_jax.models import ssd
from minitron_jax.tools import benchmark

_SEQS = flags.DEFINE_list("seqs", ["2048", "8192"], "Sequence lengths.")
_HEADS = flags.DEFINE_integer("heads", 8, "Mamba heads.")
_GROUPS = flags.DEFINE_integer("groups", 2, "Groups sharing B and C.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "Mamba head_dim.")
_STATE = flags.DEFINE_integer("state", 128, "SSM state size.")
_CHUNK = flags.DEFINE_integer("chunk", 128, "Chunk length of the chunked form.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls (median).")
_LOG = flags.DEFINE_bool("log", True, "Append the table to BENCHMARKS.md.")


def _inputs(length: int):
  rng = np.random.default_rng(0)
  h, g, p, n = _HEADS.value, _GROUPS.value, _HEAD_DIM.value, _STATE.value
  f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
  x = f32(rng.standard_normal((1, length, h, p)))
  dt = f32(np.log1p(np.exp(rng.standard_normal((1, length, h)))) * 0.1)
  A = f32(-np.exp(rng.standard_normal(h)))
  B, C = (f32(rng.standard_normal((1, length, g, n)) / np.sqrt(n)) for _ in range(2))
  D = f32(rng.standard_normal(h))
  starts = np.sort(rng.choice(np.arange(1, length), size=max(1, length // 512), replace=False))
  segments = jnp.asarray(np.searchsorted(starts, np.arange(length), side="right")[None] + 1,
                         jnp.int32)
  return x, dt, A, B, C, D, segments


def _step(scan):
  def loss(x, dt, A, B, C, D, segments):
    y, state = scan(x, dt, A, B, C, D, segments)
    return jnp.sum(y) + jnp.sum(state)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4, 5)))


def main(_):
  chunk = _CHUNK.value
  forms = {"chunked": lambda *a: ssd.ssd_chunked(*a, chunk_size=chunk),
           "sequential": ssd.ssd_sequential}
  rows = []
  for length in map(int, _SEQS.value):
    inputs = _inputs(length)
    cells = {}
    for name, scan in forms.items():
      step = _step(scan)
      temp = step.lower(*inputs).compile().memory_analysis().temp_size_in_bytes
      seconds = benchmark.seconds_per_call(step, *inputs, repeats=_REPEATS.value)
      cells[name] = (seconds, temp)
      print(f"T={length} {name}: {seconds * 1e3:.1f} ms, temp {temp / 2**20:.1f} MiB", flush=True)
    (c_s, c_m), (s_s, s_m) = cells["chunked"], cells["sequential"]
    rows.append([length, f"{c_s * 1e3:.0f}", f"{s_s * 1e3:.0f}", f"{s_s / c_s:.1f}x",
                 f"{c_m / 2**20:.0f}", f"{s_m / 2**20:.0f}"])
  if _LOG.value:
    print(benchmark.append_to_log(
        "Mamba-2 scan, chunked vs sequential (forward + backward)",
        ["T", "chunked ms", "sequential ms", "speed-up", "chunked temp MiB",
         "sequential temp MiB"], rows,
        notes=(f"Batch 1, {_HEADS.value} heads x head_dim {_HEAD_DIM.value} in {_GROUPS.value} "
               f"groups, state {_STATE.value}, chunk {chunk}, packed rows (a document start every "
               "~512 positions); experiments/benchmarks/mamba_scan.py. Temp is XLA's compiled "
               "temporary memory of the value-and-gradient program.")))


if __name__ == "__main__":
  app.run(main)
