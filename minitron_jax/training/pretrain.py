"""Plain next-token training (cross-entropy only): trains the small teachers the project ships.

Distillation has its own trainer; this one exists so a teacher with learned structure can be made
from the embedded corpus on a CPU in minutes.
"""

from __future__ import annotations

import functools
import time
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from minitron_jax.models import model
from minitron_jax.objectives import losses
from minitron_jax.models.config import ModelConfig


def next_token_loss(config: ModelConfig, params, tokens: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy [nats] of a [B,T] batch of unpacked rows (positions 1..T-1
  are targets): losses.cross_entropy, the one the distillation loop trains with."""
  return losses.cross_entropy(model.apply(config, params, tokens), tokens, jnp.ones_like(tokens))


def make_optimizer(steps: int, peak_lr: float, warmup: int, weight_decay: float = 0.01):
  schedule = optax.warmup_cosine_decay_schedule(0.0, peak_lr, warmup, steps, peak_lr * 0.01)
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=weight_decay))


def train(config: ModelConfig, params, batches: Iterable[np.ndarray], *, steps: int,
          peak_lr: float = 3e-3, warmup: int = 50,
          log: Callable[[str], None] = print, log_every: int = 50):
  """Returns trained params after `steps` AdamW steps over `batches` ([B,T+1] int arrays)."""
  optimizer = make_optimizer(steps, peak_lr, warmup)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, tokens):
    loss, grads = jax.value_and_grad(next_token_loss, argnums=1)(config, params, tokens)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = optimizer.init(params)
  started = time.perf_counter()
  for i, batch in zip(range(steps), batches):
    params, opt_state, loss = step(params, opt_state, jnp.asarray(batch))
    if (i + 1) % log_every == 0 or i + 1 == steps:
      log(f"[train] step {i + 1}/{steps} loss {float(loss):.4f} "
          f"({time.perf_counter() - started:.0f}s)")
  return params
