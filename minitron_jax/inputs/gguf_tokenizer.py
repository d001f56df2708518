"""The tokenizer a GGUF file embeds, rebuilt as a `tokenizers.Tokenizer`.

llama.cpp stores a byte-level BPE ("gpt2" model) as its token list, merges and token types, and
names the pre-tokenizer by a short key (`tokenizer.ggml.pre`) whose split rules live in llama.cpp's
source. We rebuild the keys whose rules we know; any other key, or a SentencePiece model, is
refused in one line so a run never trains on text split differently from how the model saw it.
"""

from __future__ import annotations

import functools

import tokenizers
from tokenizers import pre_tokenizers

from minitron_jax.checkpoints import gguf_checkpoint
from minitron_jax.errors import ConfigError

# llama.cpp's pre-tokenizer regexes (llama-vocab.cpp), the same ones the models' own
# tokenizer.json files use.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}"
                 r"\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}"
                r"\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _split(pattern: str) -> pre_tokenizers.PreTokenizer:
  return pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(pattern), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


PRE_TOKENIZERS = {
    "default": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    # SmolLM: every digit on its own, then GPT-2's rules.
    "smollm": lambda: pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]),
    "llama-bpe": lambda: _split(_LLAMA3_SPLIT),
    "qwen2": lambda: _split(_QWEN2_SPLIT),
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def load(path) -> tuple[tokenizers.Tokenizer, str | None]:
  """(tokenizer, eos token string or None) of a GGUF file; built once per reader (the BPE of a
  49k vocabulary takes seconds), so callers must not mutate the tokenizer."""
  return _build(gguf_checkpoint.open_reader(path))


def chat_template(path) -> str | None:
  """The chat template a GGUF file carries (`tokenizer.chat_template`), or None."""
  return gguf_checkpoint.field(gguf_checkpoint.open_reader(path), "tokenizer.chat_template")


@functools.lru_cache(maxsize=4)
def _build(reader) -> tuple[tokenizers.Tokenizer, str | None]:
  field = lambda key, default=None: gguf_checkpoint.field(reader, key, default)
  kind = field("tokenizer.ggml.model")
  if kind != "gpt2":
    raise ConfigError(f"GGUF tokenizer.ggml.model={kind!r} is not supported; allowed: 'gpt2' "
                      "(byte-level BPE); pass --config.tokenizer=PATH/tokenizer.json instead")
  pre = field("tokenizer.ggml.pre", "default")
  if pre not in PRE_TOKENIZERS:
    raise ConfigError(f"GGUF tokenizer.ggml.pre={pre!r} is not supported; allowed: "
                      f"{sorted(PRE_TOKENIZERS)}; pass --config.tokenizer=PATH/tokenizer.json "
                      "instead")
  tokens = list(field("tokenizer.ggml.tokens"))
  types = list(field("tokenizer.ggml.token_type", [1] * len(tokens)))
  merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges", [])]
  tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(
      vocab={token: i for i, token in enumerate(tokens)}, merges=merges, fuse_unk=False,
      byte_fallback=False))
  tokenizer.pre_tokenizer = PRE_TOKENIZERS[pre]()
  tokenizer.decoder = tokenizers.decoders.ByteLevel()
  # Added tokens are matched before BPE runs, as in the tokenizer.json llama.cpp converted.
  tokenizer.add_tokens([tokenizers.AddedToken(tokens[i], special=types[i] == _CONTROL,
                                              normalized=False)
                        for i in range(len(tokens)) if types[i] in (_CONTROL, _USER_DEFINED)])

  def token(key: str) -> str | None:
    index = field(f"tokenizer.ggml.{key}_token_id")
    return None if index is None else tokens[int(index)]

  bos = token("bos")
  if field("tokenizer.ggml.add_bos_token", False) and bos is not None:
    tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
        special_tokens=[(bos, tokens.index(bos))])
  else:
    tokenizer.post_processor = tokenizers.processors.ByteLevel(trim_offsets=False)
  return tokenizer, token("eos")
