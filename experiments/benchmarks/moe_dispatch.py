r"""Expert dispatch: the exact grouped matmul (lax.ragged_dot) against capacity dispatch, one MoE
layer's forward + backward, at growing expert counts with the routed work held fixed.

  python experiments/benchmarks/moe_dispatch.py --experts=8,32,128 --append

Every row routes `tokens` tokens to `top_k` of E experts of width `width` (hidden `hidden`): the
same useful work M x D x F per projection whatever E is. A backend whose ragged_dot pads every
group to M rows (XLA's generic lowering) grows with E; the capacity dispatch does E x C rows
(C = every token for the exact one, E/K times the useful work). `measure` is what gpu_suite.py
imports.
"""

import jax
import jax.numpy as jnp
from absl import app, flags

from minitron_jax.models import moe
from minitron_jax.tools import benchmark
from minitron_jax.models import config as config_lib

# Flags only when run as a script: gpu_suite.py imports this module beside others whose flag
# names overlap.
if __name__ == "__main__":
  _EXPERTS = flags.DEFINE_list("experts", ["8", "32", "128"], "Expert counts to time.")
  _TOKENS = flags.DEFINE_integer("tokens", 2048, "Tokens per step (batch x seq).")
  _TOP_K = flags.DEFINE_integer("top_k", 8, "Experts per token.")
  _HIDDEN = flags.DEFINE_integer("hidden", 512, "Hidden size D.")
  _WIDTH = flags.DEFINE_integer("width", 192, "Expert width F.")
  _FACTORS = flags.DEFINE_list("capacity_factors", ["1.25", "2.0"], "Capacity factors to time.")
  _APPEND = flags.DEFINE_bool("append", False, "Append the table to BENCHMARKS.md.")


def _step(top_k, capacity_factor, implementation):
  def loss(weights, x, logits):
    top, index = moe.route(logits, top_k, normalize=True)
    out, _ = moe.experts(x, index, *weights, jax.nn.silu, capacity_factor, implementation)
    return jnp.sum(jnp.einsum("BTKD,BTK->BTD", out, top) ** 2)
  return jax.jit(jax.value_and_grad(loss))


def dispatches(capacity_factors) -> list[tuple[float | None, str]]:
  """(capacity factor, implementation) of every dispatch timed: each exact one the library
  offers (config.MOE_DISPATCHES but "auto", which picks one of them), then the capacity path at
  each factor."""
  exact = [(None, name) for name in config_lib.MOE_DISPATCHES if name != "auto"]
  return exact + [(float(c), "capacity") for c in capacity_factors]


def label(capacity_factor: float | None, implementation: str) -> str:
  if implementation == "capacity":
    return ("exact, capacity every token (E/K)" if capacity_factor is None
            else f"capacity factor {capacity_factor} (drops overflow)")
  return f"exact, {implementation}" + (" (ragged_dot)" if implementation == "grouped" else "")


def layer_inputs(experts: int, tokens: int, hidden: int, width: int, dtype=jnp.float32):
  """(expert weights, x [1,tokens,D], router logits) of one random MoE layer."""
  keys = jax.random.split(jax.random.key(experts), 5)
  normal = lambda key, shape, fan_in: (jax.random.normal(key, shape) * fan_in ** -0.5  # noqa: E731
                                       ).astype(dtype)
  weights = (normal(keys[0], (experts, hidden, width), hidden),
             normal(keys[1], (experts, hidden, width), hidden),
             normal(keys[2], (experts, width, hidden), width))
  x = jax.random.normal(keys[3], (1, tokens, hidden)).astype(dtype)
  logits = jax.random.normal(keys[4], (1, tokens, experts))
  return weights, x, logits


def measure(inputs, top_k: int, capacity_factor: float | None, implementation: str,
            repeats: int = 3) -> float:
  """Seconds per forward + backward of one MoE layer with the given dispatch."""
  return benchmark.seconds_per_call(_step(top_k, capacity_factor, implementation), *inputs,
                                    repeats=repeats)


def main(argv):
  del argv
  d, f, tokens, k = _HIDDEN.value, _WIDTH.value, _TOKENS.value, _TOP_K.value
  rows = []
  for experts in map(int, _EXPERTS.value):
    inputs = layer_inputs(experts, tokens, d, f)
    row = [experts, k]
    for factor, implementation in dispatches(_FACTORS.value):
      try:
        row.append(f"{measure(inputs, k, factor, implementation) * 1e3:.1f}")
      except config_lib.ConfigError:  # a kernel this machine lacks (tokamax off a GPU install)
        row.append("n/a")
    rows.append(row)
    print(row, flush=True)
  header = ["experts E", "top-k"] + [f"{label(*run)} ms" for run in dispatches(_FACTORS.value)]
  notes = (f"One MoE layer, forward + backward, {tokens} tokens, D={d}, F={f}: the routed work "
           "is the same in every row. Without a capacity factor the model dispatches exactly: "
           "grouped on TPU, capacity-every-token on CPU and GPU.")
  if _APPEND.value:
    print(benchmark.append_to_log("MoE dispatch", header, rows, notes))


if __name__ == "__main__":
  app.run(main)
