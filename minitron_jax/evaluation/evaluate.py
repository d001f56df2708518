"""Downstream evaluation: multiple-choice log-likelihood scoring and held-out perplexity.

Pruning and distillation are judged by what the compressed model still does, not only by its
loss. The Minitron paper reports zero-shot HellaSwag, ARC and Winogrande, which
lm-evaluation-harness scores by log-likelihood: for each choice, the sum of the log-probabilities
of the choice's tokens given the context; the prediction is the choice with the highest sum
(`acc`), or with the highest sum divided by the choice's length (`acc_norm`). This module does the
same with our own forward pass, so a pruned or distilled model is evaluated without exporting it
or installing anything, and with no download: tasks (mc_tasks.py) come from local JSONL files or
TFDS datasets already prepared locally.

Scoring batches every (example, choice) pair into padded [B,T] rows (segment_ids 0 = padding, so
the model never attends to padding); B is fixed and T is rounded up to a multiple of
`pad_to_multiple`, so a whole task compiles once per length bucket, never per example.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from minitron_jax.compress import importance
from minitron_jax.core import distributed
from minitron_jax.models import model
from minitron_jax.models.config import ModelConfig
from minitron_jax.objectives import target_logprobs
from minitron_jax.errors import ConfigError
from minitron_jax.inputs.tokenizer import Tokenizer

# The multiple-choice tasks this module scores live in mc_tasks.py; these names stay here too.
from minitron_jax.evaluation.mc_tasks import (FORMATS, TFDS_PREFIX, MultipleChoiceExample,  # noqa: E402,F401
                                   check_task, load_task, task_source, write_jsonl)


# ----------------------------------------------------------------------------- scoring


@dataclasses.dataclass(frozen=True)
class ExampleScore:
  """The per-choice numbers behind one example's predictions."""

  loglikelihoods: tuple[float, ...]  # Σ log p(scored tokens | conditioning), per choice
  num_bytes: tuple[int, ...]  # UTF-8 bytes of each choice's scored text
  num_tokens: tuple[int, ...]  # scored tokens per choice
  gold: int

  @property
  def prediction(self) -> int:
    """argmax of the summed log-likelihood (first on ties)."""
    return int(np.argmax(self.loglikelihoods))

  @property
  def prediction_norm(self) -> int:
    """argmax of the log-likelihood per UTF-8 byte of the scored text (first on ties)."""
    return int(np.argmax(np.asarray(self.loglikelihoods) / np.maximum(self.num_bytes, 1)))


@dataclasses.dataclass(frozen=True)
class _Request:
  example: int
  choice: int
  sequence: np.ndarray  # int32 [n]: conditioning then scored tokens, already truncated
  num_scored: int  # the last `num_scored` tokens of `sequence` are scored


def encode_pair(tokenizer: Tokenizer, context: str, text: str, max_length: int,
                where: str = "a pair") -> tuple[np.ndarray, int]:
  """(sequence, num_scored) as lm-evaluation-harness tokenises a pair: the context's trailing
  whitespace moves to the front of the scored text (so "Answer: " + "Paris" scores " Paris"),
  conditioning ids = encode(context), scored ids = encode(context + text)[len(conditioning):], an
  empty context conditioned on the eos; then the last max_length + 1 tokens are kept (the scored
  ones always whole). Following the harness here makes our accuracies equal its own on the same
  task (tests/test_lm_eval.py)."""
  spaces = len(context) - len(context.rstrip())
  if spaces:
    context, text = context[:-spaces], context[-spaces:] + text
  context_ids = list(tokenizer.encode(context))
  scored = list(tokenizer.encode(context + text))[len(context_ids):]
  if not context_ids:
    if tokenizer.eos_id is None:
      raise ConfigError(f"{where} has an empty context and the tokenizer has no eos to "
                        "condition on; allowed: a non-empty context")
    context_ids = [tokenizer.eos_id]
  if not scored:
    raise ConfigError(f"{where} ({text!r}) adds no tokens to its context")
  if len(scored) > max_length:
    raise ConfigError(f"{where} has {len(scored)} scored tokens, more than "
                      f"max_length={max_length}; raise max_length")
  return np.asarray((context_ids + scored)[-(max_length + 1):], np.int32), len(scored)


def _requests(tokenizer: Tokenizer, examples: Sequence[MultipleChoiceExample],
              max_length: int) -> list[_Request]:
  """Every (example, choice) pair tokenised by `encode_pair` (the harness's whitespace rule)."""
  requests = []
  for i, example in enumerate(examples):
    for j, (context, text) in enumerate(example.pairs()):
      sequence, num_scored = encode_pair(tokenizer, context, text, max_length,
                                         f"example {i} choice {j}")
      requests.append(_Request(i, j, sequence, num_scored))
  return requests


def _pack_rows(requests: Sequence[_Request], batch_size: int, pad_to_multiple: int):
  """[B,T] int32 arrays: model inputs, targets (the next token) and the scored mask.

  Row r holds request r's sequence minus its last token (the inputs) left-aligned; unused rows
  and the tail of every row are padding (segment 0), which nothing attends to or scores.
  """
  longest = max(len(r.sequence) - 1 for r in requests)
  length = -(-longest // pad_to_multiple) * pad_to_multiple
  tokens = np.zeros((batch_size, length), np.int32)
  targets = np.zeros((batch_size, length), np.int32)
  segment_ids = np.zeros((batch_size, length), np.int32)
  positions = np.zeros((batch_size, length), np.int32)
  scored = np.zeros((batch_size, length), bool)
  for row, request in enumerate(requests):
    n = len(request.sequence) - 1
    tokens[row, :n] = request.sequence[:-1]
    targets[row, :n] = request.sequence[1:]
    segment_ids[row, :n] = 1
    positions[row, :n] = np.arange(n)
    scored[row, n - request.num_scored:n] = True
  return tokens, segment_ids, positions, targets, scored


@functools.partial(jax.jit, static_argnames=("config",))
def _scored_loglikelihoods(config: ModelConfig, params, tokens, segment_ids, positions, targets,
                           scored) -> tuple[jax.Array, jax.Array]:
  """Per row: Σ over scored positions of log p(target) [B] float32, and whether every scored
  target is the argmax [B] bool (the harness's `is_greedy`). Chunked over tokens and, on a mesh,
  split over the vocabulary (target_logprobs.py): never [B, T, V] logits."""
  hidden, _ = model.hidden_states(config, params, tokens, segment_ids=segment_ids,
                                  positions=positions)
  picked, greedy = target_logprobs.target_logprobs(  # [B,T] each
      hidden, model.lm_head_kernel(config, params), targets,
      softcap=config.final_logit_softcap)
  return (jnp.sum(jnp.where(scored, picked, 0.0), axis=-1),
          jnp.all(jnp.where(scored, greedy, True), axis=-1))


def check_scoring(*, batch_size: int = 16, max_length: int = 512, pad_to_multiple: int = 64
                  ) -> None:
  for name, value in (("batch_size", batch_size), ("max_length", max_length),
                      ("pad_to_multiple", pad_to_multiple)):
    if not isinstance(value, int) or value <= 0:
      raise ConfigError(f"{name}={value!r} must be a positive integer")


# Host batch array -> the array the model runs on: jnp.asarray (one device) by default; on a
# mesh, split over the batch axes (partitioning.batch_sharding via distributed.put), so each device
# scores its rows with the params where training placed them.
Place = Callable[[np.ndarray], jax.Array]


def score_multiple_choice(config: ModelConfig, params, tokenizer: Tokenizer,
                          examples: Sequence[MultipleChoiceExample], *, batch_size: int = 16,
                          max_length: int = 512, pad_to_multiple: int = 64,
                          log: Callable[[str], None] | None = None,
                          place: Place = jnp.asarray) -> dict[str, Any]:
  """Zero-shot log-likelihood accuracy on a multiple-choice task, as lm-evaluation-harness does.

  For every choice, LL = Σ log p(token | everything before it) over the tokens of the scored text
  (the choice, or the shared `continuation`; see MultipleChoiceExample). Contexts longer than
  `max_length` tokens in all are cut from the left (the scored tokens are always kept whole).
    accuracy       fraction of examples whose argmax_j LL_j is the gold choice.
    accuracy_norm  the same with LL_j / bytes_j, bytes_j being the number of UTF-8 bytes of the
                   scored text as given (a leading delimiter space counts; whitespace moved from
                   the context does not). The harness's acc_norm divides by characters and its
                   acc_bytes by bytes, which this equals; bytes make the measure independent of
                   the tokenizer and the same as characters for ASCII text.
  Ties go to the first choice. Returns accuracy, accuracy_norm, num_examples, and per_example:
  an ExampleScore per example (its log-likelihoods, lengths and predictions).
  Pairs are scored in batches of `batch_size` rows, longest first, each padded to a multiple of
  `pad_to_multiple` tokens, so compilation happens once per length bucket.
  """
  check_scoring(batch_size=batch_size, max_length=max_length, pad_to_multiple=pad_to_multiple)
  if not examples:
    raise ConfigError("no examples to score; allowed: a non-empty list of MultipleChoiceExample")
  requests = _requests(tokenizer, examples, max_length)
  sums, _ = score_sequences(config, params, [(r.sequence, r.num_scored) for r in requests],
                            batch_size=batch_size, pad_to_multiple=pad_to_multiple, log=log,
                            place=place)
  loglikelihoods = [np.zeros(len(e.choices)) for e in examples]
  num_tokens = [np.zeros(len(e.choices), int) for e in examples]
  for request, total in zip(requests, sums):
    loglikelihoods[request.example][request.choice] = total
    num_tokens[request.example][request.choice] = request.num_scored
  per_example = [
      ExampleScore(loglikelihoods=tuple(float(v) for v in ll),
                   num_bytes=tuple(len(text.encode("utf-8")) for _, text in example.pairs()),
                   num_tokens=tuple(int(n) for n in counts), gold=example.gold)
      for example, ll, counts in zip(examples, loglikelihoods, num_tokens)]
  return dict(
      accuracy=float(np.mean([s.prediction == s.gold for s in per_example])),
      accuracy_norm=float(np.mean([s.prediction_norm == s.gold for s in per_example])),
      num_examples=len(per_example), per_example=per_example)


def score_sequences(config: ModelConfig, params, sequences: Sequence[tuple[Sequence[int], int]],
                    *, batch_size: int = 16, pad_to_multiple: int = 64,
                    log: Callable[[str], None] | None = None, place: Place = jnp.asarray
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Log-likelihoods of token sequences: for each (sequence, num_scored), Σ log p(token | the
  tokens before it) over its last num_scored tokens [N] float64, and whether each of those is
  the argmax [N] bool, in the order given. Rows run `batch_size` at a time, longest first, padded
  to a multiple of `pad_to_multiple` tokens (one compilation per length bucket); sequences must
  already fit the model (`encode_pair` cuts them)."""
  check_scoring(batch_size=batch_size, pad_to_multiple=pad_to_multiple)
  log = log or (lambda message: None)
  requests = []
  for index, (sequence, num_scored) in enumerate(sequences):
    sequence = np.asarray(sequence, np.int32)
    if not 1 <= num_scored < len(sequence):
      raise ConfigError(f"sequence {index} scores {num_scored} of its {len(sequence)} tokens; "
                        "allowed: at least one, and at least one token before them")
    requests.append(_Request(index, 0, sequence, int(num_scored)))
  started = time.perf_counter()
  order = sorted(requests, key=lambda r: -len(r.sequence))  # stable: ties keep the given order
  sums, greedy = np.zeros(len(requests)), np.zeros(len(requests), bool)
  num_batches = -(-len(order) // batch_size)
  for index, start in enumerate(range(0, len(order), batch_size)):
    chunk = order[start:start + batch_size]
    arrays = _pack_rows(chunk, batch_size, pad_to_multiple)
    chunk_sums, chunk_greedy = distributed.to_host(
        _scored_loglikelihoods(config, params, *map(place, arrays)))
    for row, request in enumerate(chunk):
      sums[request.example], greedy[request.example] = chunk_sums[row], chunk_greedy[row]
    if (index + 1) % 10 == 0 or index + 1 == num_batches:
      log(f"[evaluate] batch {index + 1}/{num_batches} (T={arrays[0].shape[1]}), "
          f"{time.perf_counter() - started:.1f}s")
  return sums, greedy


# ----------------------------------------------------------------------------- perplexity


def perplexity(config: ModelConfig, params, batches: Iterable, place: Place = jnp.asarray
               ) -> dict[str, float]:
  """Token-weighted next-token cross-entropy over every batch, and its exponential.

  batches: [B,T] token arrays or packed dicts (tokens, segment_ids with 0 = padding, positions),
  as `data.validation_batches` yields. A token is predicted only from earlier tokens of its own
  segment; loss = Σ CE / Σ predicted tokens over all batches (not a mean of batch means).
  """
  total, count = 0.0, 0
  for batch in batches:
    # importance's loss sums are the one definition of the next-token loss in this package.
    loss_sum, n = importance._lm_loss_sums_jit(
        config, params, *map(place, importance.as_batch(batch)))
    total, count = total + float(loss_sum), count + int(n)
  if count == 0:
    raise ConfigError("the perplexity batches hold no predicted tokens; allowed: batches with "
                      "at least one segment of two or more tokens")
  loss = total / count
  return dict(loss=loss, perplexity=math.exp(loss), tokens=count)


# ----------------------------------------------------------------------------- reports


def evaluate_model(config: ModelConfig, params, tokenizer: Tokenizer, *,
                   tasks: Mapping[str, Sequence[MultipleChoiceExample]],
                   perplexity_batches: Iterable | None = None, batch_size: int = 16,
                   max_length: int = 512, pad_to_multiple: int = 64,
                   log: Callable[[str], None] | None = None, place: Place = jnp.asarray
                   ) -> dict[str, float]:
  """One flat dict of metrics: `<task>/acc`, `<task>/acc_norm`, `<task>/num_examples` for every
  task, and `val_loss`, `perplexity`, `val_tokens` when perplexity_batches are given."""
  log = log or (lambda message: None)
  metrics: dict[str, float] = {}
  for name, examples in tasks.items():
    result = score_multiple_choice(config, params, tokenizer, examples, batch_size=batch_size,
                                   max_length=max_length, pad_to_multiple=pad_to_multiple, log=log,
                                   place=place)
    metrics[f"{name}/acc"] = result["accuracy"]
    metrics[f"{name}/acc_norm"] = result["accuracy_norm"]
    metrics[f"{name}/num_examples"] = result["num_examples"]
    log(f"[evaluate] {name}: acc {result['accuracy']:.4f}, acc_norm "
        f"{result['accuracy_norm']:.4f} over {result['num_examples']} examples")
  if perplexity_batches is not None:
    result = perplexity(config, params, perplexity_batches, place)
    metrics.update(val_loss=result["loss"], perplexity=result["perplexity"],
                   val_tokens=result["tokens"])
    log(f"[evaluate] validation loss {result['loss']:.4f}, perplexity {result['perplexity']:.3f} "
        f"over {result['tokens']} tokens")
  return metrics


def markdown_table(results: Mapping[str, Mapping[str, Any]], columns: Sequence[str] | None = None,
                   digits: int = 4, header_names: Mapping[str, str] | None = None) -> str:
  """Rows = models, columns = metrics (default: every metric, in order of first appearance),
  headed by `header_names[column]` where given.

  A metric a model lacks is an empty cell; floats get `digits` decimals, ints are exact.
  """
  header_names = header_names or {}
  if columns is None:
    columns = list(dict.fromkeys(key for metrics in results.values() for key in metrics))

  def cell(value: Any) -> str:
    if value is None:
      return ""
    if isinstance(value, (bool, int, np.integer)):
      return str(int(value))
    if isinstance(value, (float, np.floating)):
      return f"{float(value):.{digits}f}"
    return str(value).replace("|", "\\|")

  lines = ["| model | " + " | ".join(header_names.get(c, c) for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
  for name, metrics in results.items():
    cells = [cell(name)] + [cell(metrics.get(column)) for column in columns]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"
