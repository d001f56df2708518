"""Text generation with a KV cache, for every family model.py computes.

One jitted program per config, batch shape, max_new_tokens and greedy-or-sampling: the prompts
are prefilled in one forward, then a `lax.while_loop` decodes one token per row per step into a
fixed-size cache (kv_cache.py) until every row has stopped or max_new_tokens are out.
Temperature, top-k, top-p and the stop sequences are traced values (the stop table is padded to
a few shapes), so changing them compiles nothing.

Prompts of different lengths are left padded: every row's last prompt token sits in the same
slot, and its next token in the next one. Under `jax.set_mesh` the batch and the cache are split
like a training batch (batch over the data axes, heads over `tensor`); params split with
sharding.shard_params stay where they are.

A stop sequence is a run of token ids; a row stops once its generated tokens end with one (it is
kept in the output, as transformers keeps the eos). `generate_text` also takes stop strings: the
loop stops on each one's own encoding, and the text is cut at the first stop string however it
was spelt in tokens.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from minitron_jax.models import model as model_lib
from minitron_jax.models.config import ModelConfig
from minitron_jax.errors import ConfigError

# Left padding and the tokens after a row stops; masked out or cut off, so any valid id does.
PAD_ID = 0
# Stop-table entries left of a shorter sequence (match anything), the history before the first
# generated token (matches no stop), and the table's padding rows (match nothing); none is an id.
_ANY, _BEFORE, _NEVER = -1, -2, -3
# The stop table's rows and columns are rounded up to multiples of these, so that a few shapes
# serve every set of stop sequences.
_STOP_ROWS, _STOP_WIDTH = 4, 8


def generate(config: ModelConfig, params: model_lib.Params, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, stop_sequences: Sequence[Sequence[int]] = (),
             key: jax.Array | None = None) -> list[list[int]]:
  """The new tokens of each prompt (token ids), through the first stop sequence.

  temperature 0 is greedy (the argmax); above 0 the logits are divided by it, cut to the top_k
  most likely tokens, then to the fewest whose probability reaches top_p, and sampled with
  `key` (step i draws with fold_in(key, i), so a key reproduces a generation).
  """
  _check_sampling(temperature, top_k, top_p, key)
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ConfigError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
  prompts = [_token_ids(p, config.vocab_size, "prompt") for p in prompts]
  if not prompts:
    raise ConfigError("prompts is empty; allowed: one or more non-empty token-id sequences")
  stops = [_token_ids(s, config.vocab_size, "stop sequence") for s in stop_sequences]
  longest = max(len(p) for p in prompts)
  if longest + max_new_tokens > config.max_position_embeddings:
    raise ConfigError(f"a prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds "
                      f"max_position_embeddings={config.max_position_embeddings}")

  tokens = np.full((len(prompts), longest), PAD_ID, np.int32)
  valid = np.zeros(tokens.shape, bool)
  for row, prompt in enumerate(prompts):
    tokens[row, longest - len(prompt):] = prompt
    valid[row, longest - len(prompt):] = True
  out, counts = _generate(
      config, params, jnp.asarray(tokens), jnp.asarray(valid), _stop_table(stops),
      jax.random.key(0) if key is None else key, jnp.float32(temperature),
      jnp.int32(top_k or 0), jnp.float32(1.0 if top_p is None else top_p),
      max_new_tokens=max_new_tokens, sample=temperature > 0)
  out, counts = np.asarray(out), np.asarray(counts)
  return [out[row, :counts[row]].tolist() for row in range(len(prompts))]


def generate_text(config: ModelConfig, params: model_lib.Params, tokenizer, prompts: Sequence[str],
                  *, max_new_tokens: int, stop_strings: Sequence[str] = (),
                  temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                  key: jax.Array | None = None, max_prompt_tokens: int | None = None) -> list[str]:
  """Each prompt's completion as text, ended by the tokenizer's eos or cut before the first stop
  string (neither is part of it). `tokenizer` encodes and decodes (tokenizer.py's do).
  max_prompt_tokens keeps only each prompt's last that many tokens, as lm-evaluation-harness cuts
  a context so that it and the generation fit the model."""
  for text in stop_strings:
    if not isinstance(text, str) or not text:
      raise ConfigError(f"stop string {text!r} must be a non-empty string")
  if isinstance(prompts, str):
    raise ConfigError(f"prompts={prompts[:20]!r}... is one string; allowed: a list of strings")
  eos = getattr(tokenizer, "eos_id", None)
  stops = [_plain_ids(tokenizer, text) for text in stop_strings]
  stops = [s for s in stops if s] + ([[eos]] if eos is not None else [])
  encoded = [tokenizer.encode(p) for p in prompts]
  if max_prompt_tokens is not None:
    if not (isinstance(max_prompt_tokens, int) and max_prompt_tokens >= 1):
      raise ConfigError(f"max_prompt_tokens={max_prompt_tokens!r} must be a positive integer")
    encoded = [ids[-max_prompt_tokens:] for ids in encoded]
  generated = generate(config, params, encoded,
                       max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                       top_p=top_p, stop_sequences=stops, key=key)
  texts = []
  for ids in generated:
    if eos is not None and ids and ids[-1] == eos:
      ids = ids[:-1]
    text = tokenizer.decode(ids)
    cut = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=len(text))
    texts.append(text[:cut])
  return texts


def _plain_ids(tokenizer, text: str) -> list[int]:
  """`text`'s ids without the special tokens a tokenizer adds to every text (a BOS, say): those it
  adds to an empty one, stripped from the front and whatever is left of them from the back."""
  ids, extra = tokenizer.encode(text), tokenizer.encode("")
  front = 0
  while front < min(len(ids), len(extra)) and ids[front] == extra[front]:
    front += 1
  back = extra[front:]
  if back and ids[len(ids) - len(back):] == back:
    ids = ids[:len(ids) - len(back)]
  return ids[front:]


def _check_sampling(temperature, top_k, top_p, key) -> None:
  if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
          and temperature >= 0):
    raise ConfigError(f"temperature={temperature!r} must be >= 0 (0 is greedy)")
  if top_k is not None and not (isinstance(top_k, int) and top_k >= 1):
    raise ConfigError(f"top_k={top_k!r} must be a positive integer or None")
  if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
    raise ConfigError(f"top_p={top_p!r} must be in (0, 1] or None")
  if temperature == 0 and (top_k is not None or top_p is not None):
    raise ConfigError(f"top_k={top_k!r} / top_p={top_p!r} need temperature > 0; temperature=0 "
                      "is greedy")
  if temperature > 0 and key is None:
    raise ConfigError(f"temperature={temperature} samples; pass key=jax.random.key(seed)")


def _token_ids(ids, vocab_size: int, what: str) -> list[int]:
  if isinstance(ids, str) or not isinstance(ids, (Sequence, np.ndarray)) or len(ids) == 0:
    raise ConfigError(f"a {what} is {ids!r}; allowed: a non-empty sequence of token ids")
  for i in ids:
    if not (isinstance(i, (int, np.integer)) and 0 <= i < vocab_size):
      raise ConfigError(f"a {what} holds token id {i!r}; allowed: ids in [0, {vocab_size})")
  return [int(i) for i in ids]


def _stop_table(stops: list[list[int]]) -> jax.Array:
  """[S, M] int32: a row per stop sequence, right-aligned with _ANY to its left; rows of _NEVER
  pad S to a multiple of _STOP_ROWS (M is one of _STOP_WIDTH's)."""
  round_up = lambda n, m: max(1, -(-n // m)) * m
  width = round_up(max((len(s) for s in stops), default=1), _STOP_WIDTH)
  table = np.full((round_up(len(stops), _STOP_ROWS), width), _NEVER, np.int32)
  for row, stop in enumerate(stops):
    table[row] = _ANY
    table[row, width - len(stop):] = stop
  return jnp.asarray(table)


def _pick(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_k: jax.Array,
          top_p: jax.Array, sample: bool) -> jax.Array:
  """logits [B,V] float32 -> next tokens [B] int32 (see `generate`; top_k 0 and top_p 1: off).
  Greedy (`sample` False) is its own program: it compiles no sort and no sampler."""
  if sample:
    scaled = logits / temperature
    vocab = scaled.shape[-1]
    ordered = -jnp.sort(-scaled, axis=-1)  # [B,V], most likely first
    rank = jnp.arange(vocab)
    ordered = jnp.where(rank < jnp.where(top_k > 0, top_k, vocab), ordered, -jnp.inf)
    probs = jax.nn.softmax(ordered, axis=-1)
    # Keep a token while the tokens more likely than it hold less than top_p: the first always.
    keep = jnp.cumsum(probs, axis=-1) - probs < top_p
    lowest_kept = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)  # [B,1]
    token = jax.random.categorical(key, jnp.where(scaled >= lowest_kept, scaled, -jnp.inf))
  else:
    token = jnp.argmax(logits, axis=-1)
  return token.astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "sample"))
def _generate(config, params, tokens, valid, stops, key, temperature, top_k, top_p, *,
              max_new_tokens, sample):
  """tokens, valid [B,P] (left padded), stops [S,M] -> (new tokens [B,N] with PAD_ID after a
  row's stop, tokens generated per row [B])."""
  b, p = tokens.shape
  n = max_new_tokens
  lengths = jnp.sum(valid, axis=1, dtype=jnp.int32)  # [B]

  def next_token(hidden, step, recent, done):
    """From the last position's hidden [B,D]: (token [B], recent [B,M], done [B])."""
    logits = model_lib.logits_from_hidden(config, params, hidden[:, None])[:, 0]
    token = _pick(logits.astype(jnp.float32), jax.random.fold_in(key, step), temperature,
                  top_k, top_p, sample)
    token = jnp.where(done, PAD_ID, token)
    recent = jnp.concatenate([recent[:, 1:], token[:, None]], axis=1)
    matched = jnp.all((stops[None] == _ANY) | (stops[None] == recent[:, None]), axis=-1)  # [B,S]
    return token, recent, done | jnp.any(matched, axis=-1)

  # The prefill: pads see nothing and sit at position 0; a row's tokens at 0..length-1.
  cache = model_lib.new_cache(config, b, p + n - 1)
  positions = jnp.maximum(jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1, 0)
  hidden, cache = model_lib.decode(config, params, tokens, cache,
                                   segment_ids=valid.astype(jnp.int32), positions=positions)
  recent = jnp.full((b, stops.shape[1]), _BEFORE, jnp.int32)
  token, recent, done = next_token(hidden[:, -1], 0, recent, jnp.zeros((b,), bool))
  out = jnp.full((b, n), PAD_ID, jnp.int32).at[:, 0].set(token)

  def step(state):
    i, token, cache, out, counts, recent, done = state
    hidden, cache = model_lib.decode(config, params, token[:, None], cache,
                                     segment_ids=jnp.ones((b, 1), jnp.int32),
                                     positions=(lengths + i - 1)[:, None])
    counts = counts + ~done
    token, recent, done = next_token(hidden[:, 0], i, recent, done)
    return i + 1, token, cache, out.at[:, i].set(token), counts, recent, done

  def going(state):
    i, *_, done = state
    return (i < n) & ~jnp.all(done)

  state = (jnp.int32(1), token, cache, out, jnp.ones((b,), jnp.int32), recent, done)
  _, _, _, out, counts, _, _ = jax.lax.while_loop(going, step, state)
  return out, counts
