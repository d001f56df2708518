r"""Fused chunked KLD vs the naive one: compiled temporary memory and time per call (value and
gradients), at several vocabulary sizes.

  python experiments/benchmarks/fused_kld.py --tokens=8192 --time_tokens=2048 --hidden=256

Memory comes from XLA's memory_analysis() of the compiled value_and_grad at `tokens`; time is
measured at `time_tokens` (on a CPU the naive version at 8192 x 256k would need ~34 GB).
"""

import jax
import jax.numpy as jnp
from absl import app, flags

from minitron_jax import benchmark, fused_kld

_TOKENS = flags.DEFINE_integer("tokens", 8192, "Tokens for the memory measurement.")
_TIME_TOKENS = flags.DEFINE_integer("time_tokens", 2048, "Tokens for the timing.")
_HIDDEN = flags.DEFINE_integer("hidden", 256, "Hidden size of student and teacher.")
_VOCABS = flags.DEFINE_list("vocabs", ["32768", "131072", "262144"], "Vocabulary sizes.")
_CHUNK = flags.DEFINE_integer("chunk_size", 1024, "Fused chunk size.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Input dtype.")


def _grad_fn(loss):
  def value_and_grad(sh, shead, th, thead):
    return jax.value_and_grad(lambda a, b: loss(a, b, th, thead, chunk_size=_CHUNK.value),
                              argnums=(0, 1))(sh, shead)
  return jax.jit(value_and_grad)


def _inputs(tokens, vocab, dtype, abstract):
  shapes = [(tokens, _HIDDEN.value), (_HIDDEN.value, vocab)] * 2
  if abstract:
    return [jax.ShapeDtypeStruct(s, dtype) for s in shapes]
  keys = jax.random.split(jax.random.key(0), 4)
  return [jax.random.normal(k, s, dtype) * 0.05 for k, s in zip(keys, shapes)]


def main(argv):
  del argv
  dtype = jnp.dtype(_DTYPE.value)
  rows = []
  for vocab in map(int, _VOCABS.value):
    memory, seconds = {}, {}
    for name, loss in (("naive", fused_kld.naive_kld), ("fused", fused_kld.fused_kld)):
      compiled = _grad_fn(loss).lower(*_inputs(_TOKENS.value, vocab, dtype, True)).compile()
      memory[name] = compiled.memory_analysis().temp_size_in_bytes
      seconds[name] = benchmark.seconds_per_call(
          _grad_fn(loss), *_inputs(_TIME_TOKENS.value, vocab, dtype, False), repeats=3)
    rows.append((vocab, f"{memory['naive'] / 2**20:,.0f}", f"{memory['fused'] / 2**20:,.0f}",
                 f"{memory['fused'] / memory['naive']:.3f}", f"{seconds['naive'] * 1e3:,.0f}",
                 f"{seconds['fused'] * 1e3:,.0f}", f"{seconds['fused'] / seconds['naive']:.2f}"))
    print(rows[-1], flush=True)
  print(benchmark.append_to_log(
      f"Fused KLD vs naive ({_DTYPE.value}, hidden {_HIDDEN.value}, chunk {_CHUNK.value})",
      ["vocab", f"naive temp MiB @{_TOKENS.value} tok", f"fused temp MiB @{_TOKENS.value} tok",
       "memory ratio", f"naive ms @{_TIME_TOKENS.value} tok", f"fused ms @{_TIME_TOKENS.value} tok",
       "time ratio"], rows,
      "`python experiments/benchmarks/fused_kld.py`: value and gradients w.r.t. the student; "
      "targets: memory ratio <= 0.125, time ratio <= 1.1."))


if __name__ == "__main__":
  app.run(main)
