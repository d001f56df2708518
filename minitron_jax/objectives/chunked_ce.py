"""Next-token cross-entropy from final hidden states, a chunk of tokens at a time
(chunked_head_loss.py): no [tokens, vocab] logits, and on a mesh each device scores its own rows
(with the vocabulary split over `tensor`, its own slice of it). Evaluation and the importance
pass's drop-layer loss score with it; its gradient is exact too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from minitron_jax.objectives.chunked_head_loss import VocabShard, chunked_head_loss, logsumexp, validate_options


def _ce_terms(z, per_token, constants, w_c, vocab: VocabShard):
  """One chunk: (Σ weighted -log p(target), d loss / d logits [C,V'])."""
  del constants
  (target,) = per_token  # [C] int32, global vocabulary ids
  lse = logsumexp(z, vocab)  # [C,1]
  picked, local, inside = vocab.logits_at(z, target[:, None])  # [C,1] each
  picked = picked[:, 0]
  one_hot = (jnp.arange(z.shape[-1])[None, :] == local) & inside  # [C,V']
  g = (jnp.exp(z - lse) - one_hot) * w_c[:, None]
  return jnp.sum(w_c * (lse[:, 0] - picked)), g


def cross_entropy(hidden: jax.Array, head: jax.Array, targets: jax.Array, mask=None, *,
                  chunk_size: int = 1024, softcap: float | None = None,
                  vocabulary_first: bool = False) -> jax.Array:
  """Mean over counted tokens of -log softmax(cap(hidden @ head))[target].

  hidden [..., D] final (post-norm) states, head [D, V], targets [...] int ids, mask [...]
  (None: every token). 0 when no token counts. vocabulary_first: see chunked_head_loss."""
  validate_options(chunk_size, 1.0)
  return chunked_head_loss(_ce_terms, hidden, head.astype(hidden.dtype),
                           ((targets.astype(jnp.int32), 0),), (), mask, chunk_size, softcap,
                           vocabulary_first=vocabulary_first)
