"""Timing, the device's measured matmul peak, and the BENCHMARKS.md log the benchmarks share."""

from __future__ import annotations

import datetime
import pathlib
import platform
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

REPO = pathlib.Path(__file__).resolve().parents[2]


def seconds_per_call(fn: Callable, *args, repeats: int = 5, warmup: int = 1) -> float:
  """Median wall time of `fn(*args)` after `warmup` calls (compilation excluded)."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    started = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - started)
  return sorted(times)[len(times) // 2]


def matmul_peak_flops(dtype=jnp.float32, size: int | None = None, repeats: int = 5) -> float:
  """FLOP/s of a large square matmul on the default device: the ceiling MFU is measured against."""
  on_cpu = jax.devices()[0].platform == "cpu"
  size = size or (2048 if on_cpu else 8192)
  keys = jax.random.split(jax.random.key(0))
  a = jax.random.normal(keys[0], (size, size), dtype)
  b = jax.random.normal(keys[1], (size, size), dtype)
  matmul = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  return 2 * size**3 / seconds_per_call(matmul, a, b, repeats=repeats)


def model_config(preset: str, hidden: int, layers: int, vocab: int):
  """A named preset, or for "tiny" a Llama-style model of the given width (head_dim 64, GQA 4:1,
  MLP 4x hidden): the model the benchmark scripts measure."""
  from minitron_jax.models import config as config_lib

  if preset != "tiny":
    return config_lib.PRESETS[preset]()
  return config_lib.tiny("llama", vocab_size=vocab, hidden_size=hidden, num_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256),
                         head_dim=64, intermediate_size=4 * hidden)


def device_description() -> str:
  device = jax.devices()[0]
  if device.platform == "cpu":
    import os

    return f"{os.cpu_count()}-core {platform.processor() or platform.machine()} CPU"
  return f"{jax.device_count()} x {device.device_kind}"


def versions() -> str:
  import flax

  return f"jax {jax.__version__}, flax {flax.__version__}"


def append_to_log(title: str, header: Sequence[str], rows: Sequence[Sequence], notes: str = "",
                  path: pathlib.Path = REPO / "BENCHMARKS.md") -> str:
  """Appends one dated block (device, versions, a table) to BENCHMARKS.md and returns it."""
  date = datetime.date.today().isoformat()
  lines = [f"\n### {title}: {date}, {device_description()}, {versions()}\n",
           "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
  if notes:
    lines += ["", notes]
  block = "\n".join(lines) + "\n"
  with open(path, "a") as f:
    f.write(block)
  return block
