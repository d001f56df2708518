r"""Naive vs blockwise attention: XLA's compiled temporary memory for a training gradient at long
sequences, and the time of a training step at the sequence lengths CPU runs use.

  python experiments/benchmarks/attention.py --memory_seq=8192 --time_seqs=256,2048

Memory: value_and_grad of a 2-layer, 8-head model (hidden 64, head_dim 16, vocab 256) compiled
from shapes alone; "scores" is one layer's naive float32 [B,N,T,T] tensor. Time: a 4-layer,
8-head model (hidden 128, the default run's shape) with `tokens_per_batch` tokens per step.
`packed_segments`, `kernel_inputs` and `kernel_step` (one attention call, forward + backward, any
kernel) are what gpu_suite.py imports.
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from minitron_jax.models import attention, model
from minitron_jax.tools import benchmark
from minitron_jax.models import config as config_lib

# Flags only when run as a script: gpu_suite.py imports this module beside others whose flag
# names overlap.
if __name__ == "__main__":
  _MEMORY_SEQ = flags.DEFINE_integer("memory_seq", 8192,
                                     "Sequence length for the memory estimate.")
  _TIME_SEQS = flags.DEFINE_list("time_seqs", ["256", "2048"], "Sequence lengths to time.")
  _TOKENS = flags.DEFINE_integer("tokens_per_batch", 2048,
                                 "Tokens per timed step (batch x seq).")
  _BLOCKS = flags.DEFINE_list("block_sizes", ["128", "512"], "Blockwise block sizes to time.")


def _loss(config):
  def loss(params, tokens):
    return jnp.mean(jax.nn.logsumexp(model.apply(config, params, tokens), axis=-1))
  return jax.jit(jax.value_and_grad(loss))


def packed_segments(batch: int, seq: int, seed: int = 0) -> np.ndarray:
  """[batch, seq] int32 segment ids of packed rows: documents of random lengths (mean seq / 4)
  numbered 1, 2, ... and a padded tail (0) in the last ~5% of each row, as the data pipeline
  packs them."""
  rng = np.random.default_rng(seed)
  rows = np.zeros((batch, seq), np.int32)
  for row in rows:
    end, doc = int(seq * 0.95), 1
    start = 0
    while start < end:
      length = int(rng.integers(1, max(2, seq // 2)))
      row[start:min(start + length, end)] = doc
      start, doc = start + length, doc + 1
  return rows


def kernel_inputs(segment_ids: np.ndarray, kv_heads: int, groups: int, head_dim: int,
                  dtype) -> tuple:
  """(q, k, v, cotangent, segment ids) for `kernel_step`: random q/k/v, and a random cotangent
  that is zero at padding (kernels differ only there, where no loss is taken)."""
  b, t = segment_ids.shape
  # numpy's generator: jax.random would compile a program per shape, seconds on a CPU.
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32), dtype)  # noqa: E731
  q = normal(b, t, kv_heads, groups, head_dim)
  k, v = normal(b, t, kv_heads, head_dim), normal(b, t, kv_heads, head_dim)
  valid = (segment_ids != 0)[:, :, None, None, None]
  cotangent = jnp.asarray(np.where(valid, rng.standard_normal(q.shape, np.float32), 0.0))
  return q, k, v, cotangent, jnp.asarray(segment_ids)


def kernel_step(implementation: str, head_dim: int, block_size: int = 512):
  """Jitted forward + backward of one `attention.attend` call on `kernel_inputs`: the gradients
  w.r.t. q, k and v of the output's product with the cotangent."""

  def loss(q, k, v, cotangent, segment_ids):
    out = attention.attend(q, k, v, segment_ids=segment_ids, scale=head_dim ** -0.5,
                           implementation=implementation, block_size=block_size)
    return jnp.sum(out.astype(jnp.float32) * cotangent)

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def main(argv):
  del argv
  seq = _MEMORY_SEQ.value
  small = config_lib.tiny("llama", hidden_size=64, num_attention_heads=8, num_key_value_heads=2,
                          head_dim=16, intermediate_size=128, max_position_embeddings=seq)
  scores = 8 * seq * seq * 4
  memory = {}
  for name in ("naive", "blockwise"):
    cfg = small.replace(attention=name)
    compiled = _loss(cfg).lower(model.abstract_params(cfg),
                                jax.ShapeDtypeStruct((1, seq), jnp.int32)).compile()
    memory[name] = compiled.memory_analysis().temp_size_in_bytes
  print(benchmark.append_to_log(
      f"Attention memory, training gradient at T={seq} (2 layers, 8 heads, block 512)",
      ["one layer's naive scores MiB", "naive temp MiB", "blockwise temp MiB",
       "blockwise / scores"],
      [(f"{scores / 2**20:,.0f}", f"{memory['naive'] / 2**20:,.0f}",
        f"{memory['blockwise'] / 2**20:,.0f}", f"{memory['blockwise'] / scores:.3f}")],
      "`python experiments/benchmarks/attention.py`: XLA's compile-time estimate "
      "(memory_analysis().temp_size_in_bytes), nothing allocated; target: blockwise / scores "
      "<= 0.125."), flush=True)

  config = config_lib.tiny("llama", hidden_size=128, num_layers=4, num_attention_heads=8,
                           num_key_value_heads=4, head_dim=16, intermediate_size=512,
                           max_position_embeddings=max(map(int, _TIME_SEQS.value)))
  params = model.init(config, 0)
  rows = []
  for time_seq in map(int, _TIME_SEQS.value):
    tokens = jnp.asarray(np.random.RandomState(0).randint(
        0, 256, (max(1, _TOKENS.value // time_seq), time_seq)))
    naive = benchmark.seconds_per_call(_loss(config.replace(attention="naive")), params, tokens)
    row = [f"{tokens.shape[0]}x{time_seq}", f"{naive * 1e3:,.0f}"]
    for block in map(int, _BLOCKS.value):
      cfg = config.replace(attention="blockwise", attention_block_size=block)
      blockwise = benchmark.seconds_per_call(_loss(cfg), params, tokens)
      row += [f"{blockwise * 1e3:,.0f}", f"{blockwise / naive:.2f}"]
    rows.append(row)
    print(row, flush=True)
  header = ["batch", "naive ms/step"]
  for block in _BLOCKS.value:
    header += [f"blockwise {block} ms/step", f"ratio ({block})"]
  print(benchmark.append_to_log(
      "Attention step time (4 layers, hidden 128, 8 heads, float32, value and gradients)",
      header, rows, "`python experiments/benchmarks/attention.py`: median of 5 steps after one "
      "warm-up; target at T=256: blockwise no slower than naive."), flush=True)


if __name__ == "__main__":
  app.run(main)
