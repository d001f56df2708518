"""Each token's log-probability of its target and whether the target is the argmax, from final
hidden states a chunk of tokens at a time: what log-likelihood scoring (lm-eval's loglikelihood,
`evaluate.score_sequences`) needs, without the [tokens, vocab] logits and their log-softmax.

On a mesh it runs under `jax.shard_map` in head_loss_layout's `vocabulary_first` layout: scoring
batches are small, so each device makes its vocabulary slice of every token's logits and no
device holds the whole [D, V] head (1 GiB of float32 for Llama-3's vocabulary at D = 2048).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from minitron_jax.objectives import head_loss_layout
from minitron_jax.objectives.chunked_head_loss import VocabShard, soft_cap_with_slope


def _first_argmax(z: jax.Array, peak: jax.Array, vocab: VocabShard) -> jax.Array:
  """'CV,C1->C' the global index of the first largest logit (jnp.argmax's tie rule) across
  every vocabulary slice."""
  is_peak = z == peak
  local = jnp.where(jnp.any(is_peak, axis=-1), vocab.start + jnp.argmax(is_peak, axis=-1),
                    vocab.size)
  return local if vocab.axis is None else jax.lax.pmin(local, vocab.axis)


def _chunk_scores(hs_c, target_c, ws, cap, vocab: VocabShard):
  """hs_c [C,D], target_c [C] -> (log p(target) [C] float32, target is the argmax [C] bool)."""
  z, _ = soft_cap_with_slope(
      jnp.einsum("CD,DV->CV", hs_c, ws, preferred_element_type=jnp.float32), cap)
  peak = vocab.max(z, keepdims=True)  # [C,1]
  log_normaliser = jnp.log(vocab.sum(jnp.exp(z - peak), keepdims=True))[:, 0]
  picked = vocab.logits_at(z, target_c[:, None])[0][:, 0]
  return picked - peak[:, 0] - log_normaliser, _first_argmax(z, peak, vocab) == target_c


def _tokens_scores(hs, ws, targets, chunk_size: int, cap, vocab_axis, vocab_size: int):
  lead = hs.shape[:-1]
  num_tokens = math.prod(lead)
  chunk = min(chunk_size, num_tokens)
  num_chunks = -(-num_tokens // chunk)
  pad = num_chunks * chunk - num_tokens
  hs = jnp.pad(hs.reshape(num_tokens, -1), ((0, pad), (0, 0))).reshape(num_chunks, chunk, -1)
  targets = jnp.pad(targets.reshape(num_tokens), (0, pad)).reshape(num_chunks, chunk)
  start = 0 if vocab_axis is None else jax.lax.axis_index(vocab_axis) * ws.shape[1]
  vocab = VocabShard(vocab_axis, start, vocab_size)
  logprobs, greedy = jax.lax.map(lambda x: _chunk_scores(*x, ws, cap, vocab), (hs, targets))
  return (logprobs.reshape(-1)[:num_tokens].reshape(lead),
          greedy.reshape(-1)[:num_tokens].reshape(lead))


def target_logprobs(hidden: jax.Array, head: jax.Array, targets: jax.Array, *,
                    chunk_size: int = 1024, softcap: float | None = None
                    ) -> tuple[jax.Array, jax.Array]:
  """hidden [..., D] final (post-norm) states, head [D, V], targets [...] int ids ->
  (log softmax(cap(hidden @ head))[target] [...] float32, target == argmax [...] bool, the first
  index winning ties as jnp.argmax does)."""
  lead = hidden.shape[:-1]
  targets = targets.astype(jnp.int32)
  if math.prod(lead) == 0:
    return jnp.zeros(lead, jnp.float32), jnp.zeros(lead, bool)
  head = head.astype(hidden.dtype)
  vocab_size = head.shape[1]
  cap = None if softcap is None else float(softcap)
  layout = head_loss_layout.choose(lead, vocab_size, vocabulary_first=True)
  if layout is None:
    return _tokens_scores(hidden, head, targets, int(chunk_size), cap, None, vocab_size)
  rows = layout.rows(len(lead))
  return jax.shard_map(
      lambda hs, ws, t: _tokens_scores(hs, ws, t, int(chunk_size), cap, layout.vocab_axis,
                                       vocab_size),
      mesh=layout.mesh, in_specs=(layout.rows(hidden.ndim), layout.head, rows),
      out_specs=(rows, rows), check_vma=False)(hidden, head, targets)
