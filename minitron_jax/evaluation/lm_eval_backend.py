"""Our JAX model as a model backend of EleutherAI's lm-evaluation-harness (`lm-eval`).

The harness owns the tasks (prompts, few-shot examples, metrics); a backend only answers three
kinds of request, which this one answers with the project's own machinery, batched:
  loglikelihood          log p(continuation | context) and whether it is the greedy choice:
                         evaluate.encode_pair + evaluate.score_sequences, the same code as
                         evaluate.score_multiple_choice.
  loglikelihood_rolling  a text's whole log-likelihood, in windows of max_length tokens
                         (every token predicted once, each with as much context as fits).
  generate_until         generate.generate_text: KV cache, greedy or sampled, stop strings.

Any model the project loads can be evaluated: a Hugging Face directory or a `.gguf` file
(hf.load; their own tokenizer by default) or a model a stage saved (checkpoint.load_model; pass
`tokenizer=`, as the run's config.tokenizer). Under `jax.set_mesh` (or with `mesh=`), params are
placed with sharding.shard_params and every batch is split over the data axes.

  import lm_eval
  from minitron_jax.evaluation.lm_eval_backend import MinitronLM
  lm_eval.simple_evaluate(model=MinitronLM("path/to/model"), tasks=["arc_easy"])

or from the shell with `python -m minitron_jax.lm_eval`. The backend is registered as
"minitron_jax" once this module is imported (lm-eval 0.4.13 discovers no plugins by entry
point, so its own `lm_eval` command does not know it).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import subprocess
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import lm_eval.models  # noqa: F401  (the harness's own backends, before ours joins the registry)
import lm_eval.evaluator
import lm_eval.loggers.utils
import numpy as np
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from minitron_jax.checkpoints import checkpoint, gguf_checkpoint, hf
from minitron_jax.core import distributed
from minitron_jax.evaluation import evaluate
from minitron_jax.models import generate, partitioning, sharding
from minitron_jax.inputs import tokenizer as tokenizer_lib
from minitron_jax.models.config import ModelConfig
from minitron_jax.errors import ConfigError


def _git_commit_quietly() -> str | None:
  """What lm-eval records as its results' git_hash, without git's stderr: the harness runs `git
  describe` with its stderr on ours, so outside a repository every harness call printed 'fatal:
  not a git repository'."""
  try:
    return subprocess.check_output(["git", "describe", "--always"],
                                   stderr=subprocess.DEVNULL).strip().decode()
  except (subprocess.CalledProcessError, FileNotFoundError):
    return lm_eval.loggers.utils.get_commit_from_path(os.getcwd())


lm_eval.evaluator.get_git_commit_hash = _git_commit_quietly

NAME = "minitron_jax"
# The harness's default generation budget when a task names none (its hf backend's).
DEFAULT_MAX_GEN_TOKS = 256
# Generation keywords a task may pass; anything else (beams, penalties) is refused, not ignored.
_GEN_KEYS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p")


def _positive_int(name: str, value: Any) -> int:
  """An int from the harness's `key=value` strings or from Python; one line when it is not."""
  try:
    number = int(value)
  except (TypeError, ValueError):
    number = None
  if number is None or number <= 0 or number != float(value):
    raise ConfigError(f"{name}={value!r} must be a positive integer")
  return number


def load(model_path: str | os.PathLike, tokenizer: str | tokenizer_lib.Tokenizer | None = None,
         *, param_dtype: str | None = None, shardings: Callable[[ModelConfig], Any] | None = None
         ) -> tuple[ModelConfig, Any, tokenizer_lib.Tokenizer]:
  """(config, params, tokenizer) of a Hugging Face directory, a `.gguf` file or a stage's saved
  model. The tokenizer defaults to the model's own (its tokenizer.json, or the one a GGUF
  embeds); a saved model has none, so it needs `tokenizer` ("bytes", a tokenizer.json, a
  directory holding one or a .gguf file). `shardings(config)` restores a saved model directly
  onto a mesh."""
  path = pathlib.Path(model_path).expanduser()
  allowed = "allowed: a Hugging Face model directory, a .gguf file or a stage's saved model"
  if checkpoint.is_saved_model(path):
    if tokenizer is None:
      raise ConfigError(f"{path} is a saved model, which holds no tokenizer; pass tokenizer= "
                        "(the run's config.tokenizer: 'bytes', a tokenizer.json or a directory)")
    config = checkpoint.load_config(path)
    if param_dtype is not None:
      config = config.replace(param_dtype=param_dtype)
    _, params = checkpoint.load_model(path, None if shardings is None else shardings(config))
  elif gguf_checkpoint.is_gguf(path) or (path / "config.json").is_file():
    if not path.exists():
      raise ConfigError(f"model_path={str(model_path)!r} does not exist; {allowed}")
    config, params = hf.load(path, param_dtype=param_dtype)
  else:
    raise ConfigError(f"model_path={str(model_path)!r} is not a model; {allowed}")
  if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
    tokenizer = tokenizer_lib.load_tokenizer(path if tokenizer is None else tokenizer)
  if tokenizer.vocab_size > config.vocab_size:
    raise ConfigError(f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} tokens; the "
                      f"model's vocab_size={config.vocab_size} is smaller")
  return config, params, tokenizer


def rolling_windows(ids: Sequence[int], prefix: int, max_length: int
                    ) -> list[tuple[np.ndarray, int]]:
  """(sequence, num_scored) windows that predict every token of `ids` exactly once, the first
  from `prefix` alone: window i scores ids[i*L:(i+1)*L] (L = max_length) after as many of the
  tokens before them as fit, so the last window has a full context (the harness's rule)."""
  full = [prefix] + list(ids)
  windows = []
  for start in range(0, len(ids), max_length):
    end = min(start + max_length, len(ids))  # scores full[start + 1:end + 1]
    windows.append((np.asarray(full[max(0, end - max_length):end + 1], np.int32), end - start))
  return windows


@register_model(NAME)
class MinitronLM(LM):
  """An lm-eval model backed by our JAX forward pass.

  model_path: a Hugging Face directory, a `.gguf` file or a stage's saved model (see `load`);
    or pass config, params and tokenizer of a model already in memory.
  batch_size: rows per forward pass (scoring) and prompts per generation batch.
  max_length: the longest context, in tokens (default: the model's max_position_embeddings).
  pad_to_multiple: scoring rows are padded to a multiple of this (one compilation per bucket).
  max_gen_toks: a generation's budget when a task names none.
  seed: the key of sampled generations (do_sample=True).
  mesh: place params and batches on it (default: the mesh in context when built, if any).
  """

  def __init__(self, model_path: str | os.PathLike | None = None, *,
               tokenizer: str | tokenizer_lib.Tokenizer | None = None,
               config: ModelConfig | None = None, params: Any = None,
               batch_size: int | str = 16, max_length: int | str | None = None,
               pad_to_multiple: int | str = 64, max_gen_toks: int | str = DEFAULT_MAX_GEN_TOKS,
               param_dtype: str | None = None, seed: int | str = 0,
               mesh: jax.sharding.Mesh | None = None, max_batch_size: Any = None,
               device: Any = None):
    del max_batch_size, device  # the harness always passes them; JAX places arrays itself
    super().__init__()
    if mesh is None:
      mesh = jax.sharding.get_mesh()
    self._mesh = None if mesh.empty else mesh
    if str(batch_size).startswith("auto"):
      raise ConfigError(f"batch_size={batch_size!r} is not supported; allowed: a positive integer")
    self.batch_size = _positive_int("batch_size", batch_size)
    self.pad_to_multiple = _positive_int("pad_to_multiple", pad_to_multiple)
    self.max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
    self._key = jax.random.key(int(seed))
    self._generations = 0  # batches sampled so far: each folds its own key
    if model_path is not None:
      if config is not None or params is not None:
        raise ConfigError("pass model_path or config and params, not both")
      shardings = None if self._mesh is None else (
          lambda config: sharding.param_shardings(config, self._mesh))
      config, params, tokenizer = load(model_path, tokenizer, param_dtype=param_dtype,
                                       shardings=shardings)
    elif config is None or params is None or tokenizer is None:
      raise ConfigError("pass model_path=PATH, or config, params and tokenizer")
    elif isinstance(tokenizer, (str, os.PathLike)):
      tokenizer = tokenizer_lib.load_tokenizer(tokenizer)
    if self._mesh is not None:  # weights already placed stay where they are (no copy)
      params = sharding.shard_params(config, params, self._mesh)
    self.config, self.params, self.tokenizer = config, params, tokenizer
    self.max_length = (config.max_position_embeddings if max_length is None
                       else _positive_int("max_length", max_length))

  # ------------------------------------------------------------------- the harness's interface

  @property
  def tokenizer_name(self) -> str:
    return self.tokenizer.name.replace("/", "__")

  def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    sequences = [self._pair(*request.args, where=f"request {i}")
                 for i, request in enumerate(requests)]
    sums, greedy = self._score(sequences)
    results = [(float(s), bool(g)) for s, g in zip(sums, greedy)]
    for request, result in zip(requests, results):
      self.cache_hook.add_partial("loglikelihood", request.args, result)
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    # The first token is predicted from the harness's prefix: the BOS a tokenizer puts before
    # every text (then it is not scored itself), else the eos.
    added = list(self.tokenizer.encode(""))
    prefix = added[0] if added else self.tokenizer.eos_id
    if prefix is None:
      raise ConfigError(f"tokenizer {self.tokenizer.name} has no BOS or eos to start a rolling "
                        "log-likelihood from; allowed: a tokenizer with either")
    windows, owner = [], []
    for index, request in enumerate(requests):
      ids = list(self.tokenizer.encode(request.args[0]))
      if added and ids[:1] == added[:1]:
        ids = ids[1:]
      for window in rolling_windows(ids, prefix, self.max_length):
        windows.append(window)
        owner.append(index)
    sums, _ = self._score(windows)
    totals = np.zeros(len(requests))
    np.add.at(totals, np.asarray(owner, int), sums)
    results = [float(t) for t in totals]
    for request, result in zip(requests, results):
      self.cache_hook.add_partial("loglikelihood_rolling", request.args, result)
    return results

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    # Requests with the same settings generate together, longest prompt first (less padding).
    groups: dict[str, list[int]] = {}
    for index, request in enumerate(requests):
      groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
    results: list[str | None] = [None] * len(requests)
    for indices in groups.values():
      settings = self._generation_settings(requests[indices[0]].args[1])
      indices = sorted(indices, key=lambda i: -len(requests[i].args[0]))
      for start in range(0, len(indices), self.batch_size):
        chunk = indices[start:start + self.batch_size]
        texts = self._generate([requests[i].args[0] for i in chunk], **settings)
        for i, text in zip(chunk, texts):
          results[i] = text
          self.cache_hook.add_partial("generate_until", requests[i].args, text)
    return results

  # ------------------------------------------------------------------- the work

  def _pair(self, context: str, continuation: str, where: str) -> tuple[np.ndarray, int]:
    return evaluate.encode_pair(self.tokenizer, context, continuation, self.max_length, where)

  def _place(self, array: np.ndarray) -> jax.Array:
    if self._mesh is None:
      return jnp.asarray(array)
    return distributed.put(array, partitioning.batch_sharding(self._mesh, array.shape))

  def _score(self, sequences) -> tuple[np.ndarray, np.ndarray]:
    if not sequences:
      return np.zeros(0), np.zeros(0, bool)
    with self._in_mesh():
      return evaluate.score_sequences(self.config, self.params, sequences,
                                      batch_size=self.batch_size,
                                      pad_to_multiple=self.pad_to_multiple, place=self._place)

  def _generation_settings(self, gen_kwargs: dict) -> dict[str, Any]:
    """A task's generation keywords as generate_text's arguments: greedy unless do_sample."""
    kwargs = dict(gen_kwargs or {})
    unknown = sorted(set(kwargs) - set(_GEN_KEYS))
    if unknown:
      raise ConfigError(f"generation settings {unknown} are not supported; allowed: "
                        f"{list(_GEN_KEYS)}")
    until = kwargs.get("until") or []
    until = [until] if isinstance(until, str) else [u for u in until if u]
    max_new = _positive_int("max_gen_toks", kwargs.get("max_gen_toks", self.max_gen_toks))
    if max_new >= self.max_length:
      raise ConfigError(f"max_gen_toks={max_new} leaves no room for a prompt in "
                        f"max_length={self.max_length}")
    settings = dict(stop_strings=until, max_new_tokens=max_new,
                    max_prompt_tokens=self.max_length - max_new)
    if kwargs.get("do_sample"):  # like transformers: temperature alone does not sample
      top_k, top_p = kwargs.get("top_k"), kwargs.get("top_p")
      settings.update(temperature=float(kwargs.get("temperature", 1.0)),
                      top_k=None if top_k is None else int(top_k),
                      top_p=None if top_p is None else float(top_p))
    return settings

  def _generate(self, prompts: list[str], **settings) -> list[str]:
    if settings.get("temperature", 0) > 0:
      settings["key"] = jax.random.fold_in(self._key, self._generations)
      self._generations += 1
    with self._in_mesh():
      return generate.generate_text(self.config, self.params, self.tokenizer, prompts, **settings)

  def _in_mesh(self):
    # generate and the model split the batch over the mesh in context (jax.set_mesh).
    return contextlib.nullcontext() if self._mesh is None else jax.set_mesh(self._mesh)
