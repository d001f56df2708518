r"""Fused chunked KLD vs the naive one: compiled temporary memory and time per call (value and
gradients), at several vocabulary sizes.

  python experiments/benchmarks/fused_kld.py --tokens=8192 --time_tokens=2048 --hidden=256

Memory comes from XLA's memory_analysis() of the compiled value_and_grad at `tokens`; time is
measured at `time_tokens` (on a CPU the naive version at 8192 x 256k would need ~34 GB).
`measure` is what gpu_suite.py imports.
"""

import jax
import jax.numpy as jnp
from absl import app, flags

from minitron_jax.objectives import fused_kld
from minitron_jax.tools import benchmark

# Flags only when run as a script: gpu_suite.py imports this module beside others whose flag
# names overlap.
if __name__ == "__main__":
  _TOKENS = flags.DEFINE_integer("tokens", 8192, "Tokens for the memory measurement.")
  _TIME_TOKENS = flags.DEFINE_integer("time_tokens", 2048, "Tokens for the timing.")
  _HIDDEN = flags.DEFINE_integer("hidden", 256, "Hidden size of student and teacher.")
  _VOCABS = flags.DEFINE_list("vocabs", ["32768", "131072", "262144"], "Vocabulary sizes.")
  _CHUNK = flags.DEFINE_integer("chunk_size", 1024, "Fused chunk size.")
  _DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Input dtype.")


def _grad_fn(loss, chunk):
  def value_and_grad(sh, shead, th, thead):
    return jax.value_and_grad(lambda a, b: loss(a, b, th, thead, chunk_size=chunk),
                              argnums=(0, 1))(sh, shead)
  return jax.jit(value_and_grad)


def _inputs(tokens, hidden, vocab, dtype, abstract):
  shapes = [(tokens, hidden), (hidden, vocab)] * 2
  if abstract:
    return [jax.ShapeDtypeStruct(s, dtype) for s in shapes]
  keys = jax.random.split(jax.random.key(0), 4)
  return [jax.random.normal(k, s, dtype) * 0.05 for k, s in zip(keys, shapes)]


def measure(vocab: int, tokens: int, time_tokens: int, hidden: int, chunk: int, dtype,
            repeats: int = 3) -> dict:
  """Naive and fused: compiled temp bytes at `tokens` (nothing allocated) and seconds per call
  at `time_tokens`."""
  out = {}
  for name, loss in (("naive", fused_kld.naive_kld), ("fused", fused_kld.fused_kld)):
    compiled = _grad_fn(loss, chunk).lower(*_inputs(tokens, hidden, vocab, dtype, True)).compile()
    out[f"{name}_temp_bytes"] = compiled.memory_analysis().temp_size_in_bytes
    out[f"{name}_seconds"] = benchmark.seconds_per_call(
        _grad_fn(loss, chunk), *_inputs(time_tokens, hidden, vocab, dtype, False),
        repeats=repeats)
  out["memory_ratio"] = out["fused_temp_bytes"] / out["naive_temp_bytes"]
  out["time_ratio"] = out["fused_seconds"] / out["naive_seconds"]
  return out


def main(argv):
  del argv
  dtype = jnp.dtype(_DTYPE.value)
  rows = []
  for vocab in map(int, _VOCABS.value):
    m = measure(vocab, _TOKENS.value, _TIME_TOKENS.value, _HIDDEN.value, _CHUNK.value, dtype)
    rows.append((vocab, f"{m['naive_temp_bytes'] / 2**20:,.0f}",
                 f"{m['fused_temp_bytes'] / 2**20:,.0f}", f"{m['memory_ratio']:.3f}",
                 f"{m['naive_seconds'] * 1e3:,.0f}", f"{m['fused_seconds'] * 1e3:,.0f}",
                 f"{m['time_ratio']:.2f}"))
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
