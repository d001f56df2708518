"""Tokenizers behind one small protocol, so the data pipeline never cares where ids come from.

The shipped teacher reads UTF-8 bytes (`ByteTokenizer`); real teachers ship a Hugging Face
`tokenizer.json` or embed a tokenizer in their GGUF file, both run by the `tokenizers` library
(`HFTokenizer`); and `train_bpe_tokenizer` trains a byte-level BPE locally for a student with a
smaller vocabulary, without any download.
"""

from __future__ import annotations

import json
import pathlib
import shutil
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

import tokenizers

from minitron_jax.checkpoints import gguf_checkpoint
from minitron_jax.inputs import gguf_tokenizer
from minitron_jax.errors import ConfigError

BYTES = "bytes"
TOKENIZER_FILE = "tokenizer.json"
# Special tokens that end a document in common tokenizers, tried in order when no
# tokenizer_config.json names the eos token.
EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>")
CONFIG_FILE = "tokenizer_config.json"
# What describes a Hugging Face tokenizer beside tokenizer.json: an export copies those its
# source has (special tokens, chat template).
SIDE_FILES = (CONFIG_FILE, "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
              "chat_template.json")
# The class `transformers.AutoTokenizer` loads a written tokenizer.json with, as it is (a
# model-specific class may rebuild the pipeline from the vocabulary instead).
FAST_CLASS = "PreTrainedTokenizerFast"


def _write_config(directory: pathlib.Path, model_max_length: int | None, **fields) -> None:
  config = {"tokenizer_class": FAST_CLASS, "clean_up_tokenization_spaces": False,
            **{k: v for k, v in fields.items() if v is not None}}
  if model_max_length is not None:
    config["model_max_length"] = model_max_length
  (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


NUL_TOKEN = "\u0100"  # the byte-level character of byte 0


def byte_level_tokenizer() -> tokenizers.Tokenizer:
  """The `tokenizers` pipeline that encodes as ByteTokenizer: each UTF-8 byte is the token whose
  id is its value (byte-level characters, no merges, no special tokens)."""
  alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
  byte_chars = {ord(c) for c in alphabet}
  # GPT-2's byte -> character table: printable bytes are themselves, the rest shifted past 255.
  table, shifted = {}, 0
  for byte in range(256):
    if byte in byte_chars:
      table[byte] = chr(byte)
    else:
      table[byte] = chr(256 + shifted)
      shifted += 1
  tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(
      vocab={char: byte for byte, char in table.items()}, merges=[], fuse_unk=False))
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                use_regex=False)
  tokenizer.decoder = tokenizers.decoders.ByteLevel()
  return tokenizer


@runtime_checkable
class Tokenizer(Protocol):
  """What the data pipeline needs from a tokenizer."""

  name: str
  vocab_size: int
  eos_id: int | None

  def encode(self, text: str) -> list[int]:
    ...


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255; no eos (all 256 ids are bytes), documents end at segment edges."""

  name = BYTES
  vocab_size = 256
  eos_id = None

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids: Iterable[int]) -> str:
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

  def save_pretrained(self, directory: str | pathlib.Path,
                      model_max_length: int | None = None) -> None:
    """tokenizer.json and tokenizer_config.json that `transformers` loads and that encode as
    this tokenizer does."""
    directory = pathlib.Path(directory)
    tokenizer = byte_level_tokenizer()
    # Hugging Face tools want an end-of-text token (lm-eval's hf backend conditions an empty
    # context on it): the NUL byte's, id 0, which text does not hold. As a special token it is
    # matched in raw text, so a text holding U+0100 (its byte-level character, 'Ā') is the one
    # case the two tokenizers encode differently.
    tokenizer.add_special_tokens([tokenizers.AddedToken(NUL_TOKEN, special=True,
                                                        normalized=False)])
    tokenizer.save(str(directory / TOKENIZER_FILE))
    _write_config(directory, model_max_length, eos_token=NUL_TOKEN)

  def __repr__(self) -> str:
    return "ByteTokenizer()"


class HFTokenizer:
  """A Hugging Face `tokenizer.json` (or a tokenizer a GGUF file embeds), with the eos id from
  tokenizer_config.json beside the file, or the GGUF's own.

  `add_special_tokens=True` applies the file's post-processor (e.g. Llama 3's BOS), which is how
  the teacher saw its training documents.
  """

  def __init__(self, path: str | pathlib.Path, eos_token: str | None = None,
               add_special_tokens: bool = True):
    path = pathlib.Path(path)
    if gguf_checkpoint.is_gguf(path):
      self._tokenizer, embedded_eos = gguf_tokenizer.load(path)
      eos_token = eos_token or embedded_eos
    else:
      try:
        self._tokenizer = tokenizers.Tokenizer.from_file(str(path))
      except Exception as e:  # the Rust side raises a bare Exception for malformed files
        raise ConfigError(f"tokenizer file {str(path)!r} could not be read: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
      eos_token = eos_token or _configured_eos(path.parent)
    self.name = str(path)
    self.path = path
    self.add_special_tokens = add_special_tokens
    self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
    if eos_token is not None:
      self.eos_id = self._tokenizer.token_to_id(eos_token)
      if self.eos_id is None:
        raise ConfigError(f"eos_token={eos_token!r} is not in the vocabulary of {self.name}")
    else:
      added = self._tokenizer.get_added_tokens_decoder().values()
      special = {t.content for t in added if t.special}
      found = [t for t in EOS_CANDIDATES if t in special]
      self.eos_id = self._tokenizer.token_to_id(found[0]) if found else None
      eos_token = found[0] if found else None
    self.eos_token = eos_token

  def encode(self, text: str) -> list[int]:
    return self._tokenizer.encode(text, add_special_tokens=self.add_special_tokens).ids

  def decode(self, ids: Iterable[int]) -> str:
    return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

  def token_to_id(self, token: str) -> int | None:
    return self._tokenizer.token_to_id(token)

  @property
  def bos_id(self) -> int | None:
    """The token the post-processor puts first (Llama 3's BOS), or None."""
    ids = self._tokenizer.encode("", add_special_tokens=True).ids
    return ids[0] if ids else None

  def save_pretrained(self, directory: str | pathlib.Path,
                      model_max_length: int | None = None) -> None:
    """The tokenizer files of a model directory: the source's own (tokenizer.json and what lies
    beside it: tokenizer_config.json, special tokens, chat template) copied, or, for a tokenizer a
    GGUF file embeds, its tokenizer.json and a tokenizer_config.json with its special tokens and
    chat template written."""
    directory = pathlib.Path(directory)
    if gguf_checkpoint.is_gguf(self.path):
      self._tokenizer.save(str(directory / TOKENIZER_FILE))
      bos = self.bos_id
      _write_config(directory, model_max_length, eos_token=self.eos_token,
                    bos_token=None if bos is None else self._tokenizer.id_to_token(bos),
                    chat_template=gguf_tokenizer.chat_template(self.path))
      return
    shutil.copyfile(self.path, directory / TOKENIZER_FILE)
    copied = [f for f in SIDE_FILES if (self.path.parent / f).is_file()]
    for name in copied:
      shutil.copyfile(self.path.parent / name, directory / name)
    if CONFIG_FILE not in copied:
      _write_config(directory, model_max_length, eos_token=self.eos_token)

  def __repr__(self) -> str:
    return f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def _configured_eos(directory: pathlib.Path) -> str | None:
  """The eos token named by a tokenizer_config.json in `directory`, if there is one."""
  config_path = directory / "tokenizer_config.json"
  if not config_path.is_file():
    return None
  eos = json.loads(config_path.read_text()).get("eos_token")
  return eos.get("content") if isinstance(eos, dict) else eos


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, path: str | pathlib.Path,
                        eos_token: str = "<|endoftext|>", min_frequency: int = 2) -> HFTokenizer:
  """Trains a byte-level BPE (GPT-2 style: every byte representable) and saves its tokenizer.json.

  `path` is a directory (the file becomes path/tokenizer.json) or a path ending in .json. The eos
  token is special token 0. Returns the saved tokenizer, loaded back the way `load_tokenizer` would.
  """
  alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
  if vocab_size < len(alphabet) + 1:
    raise ConfigError(f"vocab_size={vocab_size} is too small for byte-level BPE; "
                      f"allowed: >= {len(alphabet) + 1} (256 bytes + eos)")
  tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = tokenizers.decoders.ByteLevel()
  tokenizer.post_processor = tokenizers.processors.ByteLevel(trim_offsets=False)
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[eos_token],
      initial_alphabet=alphabet, show_progress=False)
  tokenizer.train_from_iterator(texts, trainer)
  path = pathlib.Path(path)
  file = path if path.suffix == ".json" else path / TOKENIZER_FILE
  file.parent.mkdir(parents=True, exist_ok=True)
  tokenizer.save(str(file))
  return HFTokenizer(file, eos_token=eos_token)


def load_tokenizer(spec: str | pathlib.Path, eos_token: str | None = None) -> Tokenizer:
  """"bytes", a tokenizer.json file, a model directory holding tokenizer.json, or a `.gguf` file
  (the tokenizer it embeds).

  eos_token overrides the eos a Hugging Face tokenizer would otherwise get from its
  tokenizer_config.json or its special tokens (e.g. '<|end_of_text|>' for a Llama 3 instruct
  teacher whose configured eos is '<|eot_id|>').
  """
  if str(spec) == BYTES:
    return ByteTokenizer()
  allowed = f"allowed: {BYTES!r}, a tokenizer.json file, a directory holding one, or a .gguf file"
  path = pathlib.Path(spec).expanduser()
  if path.is_dir():
    if not (path / TOKENIZER_FILE).is_file():
      raise ConfigError(f"tokenizer={str(spec)!r} is a directory without {TOKENIZER_FILE}; "
                        f"{allowed}")
    path = path / TOKENIZER_FILE
  elif not path.is_file():
    raise ConfigError(f"tokenizer={str(spec)!r} does not exist; {allowed}")
  return HFTokenizer(path, eos_token=eos_token)
