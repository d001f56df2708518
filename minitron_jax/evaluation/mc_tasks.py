"""Multiple-choice tasks as data: one example type, and loaders for local JSONL files or TFDS
datasets in four formats (generic, HellaSwag, ARC, Winogrande). evaluate.py scores them.

A task file is one JSON object per line; `format` says which fields hold the context, the choices
and the gold answer (generic: `context`, `choices`, `gold`, and `continuation` for Winogrande's
partial scoring). `tfds:NAME` reads a TFDS dataset already prepared locally (nothing downloads).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from minitron_jax.inputs import data
from minitron_jax.errors import ConfigError

FORMATS = ("generic", "hellaswag", "arc", "winogrande")
TFDS_PREFIX = "tfds:"  # "tfds:NAME" always means a TFDS dataset, even if a file NAME exists
_JSONL_SUFFIXES = (".jsonl", ".json")


# ----------------------------------------------------------------------------- tasks


@dataclasses.dataclass(frozen=True)
class MultipleChoiceExample:
  """One question: a context, N choices and the index of the right one.

  Ordinarily choice j is scored as the continuation of `context`: the text scored is
  `choices[j]` and the conditioning text is `context` (include any delimiter, e.g. a leading space,
  in the choice). With `continuation` set (Winogrande's partial scoring) the choices are instead
  alternative endings of the context: the conditioning text is `context + choices[j]` and the
  text scored is `continuation`, the same for every choice.
  """

  context: str
  choices: tuple[str, ...]
  gold: int
  continuation: str | None = None

  def __post_init__(self):
    object.__setattr__(self, "choices", tuple(self.choices))
    if len(self.choices) < 2 or not all(isinstance(c, str) for c in self.choices):
      raise ConfigError(f"choices={self.choices!r} must be at least two strings")
    if not isinstance(self.gold, (int, np.integer)) or not 0 <= self.gold < len(self.choices):
      raise ConfigError(f"gold={self.gold!r} must be an index in [0, {len(self.choices)})")
    object.__setattr__(self, "gold", int(self.gold))

  def pairs(self) -> list[tuple[str, str]]:
    """(conditioning text, scored text) for every choice, in order."""
    if self.continuation is None:
      return [(self.context, choice) for choice in self.choices]
    return [(self.context + choice, self.continuation) for choice in self.choices]

  def to_json(self) -> dict[str, Any]:
    record = dict(context=self.context, choices=list(self.choices), gold=self.gold)
    if self.continuation is not None:
      record["continuation"] = self.continuation
    return record


def write_jsonl(examples: Iterable[MultipleChoiceExample], path: str | os.PathLike) -> None:
  """One JSON object per line (`context`, `choices`, `gold`, and `continuation` when set), which
  `load_task(path)` reads back unchanged."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for example in examples:
      f.write(json.dumps(example.to_json(), ensure_ascii=False) + "\n")


def _plain(value: Any) -> Any:
  """TFDS record values (bytes, numpy scalars and arrays) as str, int and lists."""
  if isinstance(value, Mapping):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, np.ndarray):
    return _plain(value.item()) if value.ndim == 0 else [_plain(v) for v in value]
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if isinstance(value, (bytes, np.bytes_)):
    return bytes(value).decode("utf-8", errors="replace")
  if isinstance(value, np.integer):
    return int(value)
  return value


def _index(value: Any, count: int, where: str, base: int = 0) -> int:
  """An int (or int-like string) answer index, `base`-based, as a 0-based index below count."""
  try:
    index = int(value) - base
  except (TypeError, ValueError):
    raise ConfigError(f"answer {value!r} in {where} is not an integer index") from None
  if not 0 <= index < count:
    raise ConfigError(f"answer {value!r} in {where} is out of range for {count} choices")
  return index


def _hellaswag_text(text: str) -> str:
  """lm-evaluation-harness's HellaSwag clean-up: WikiHow [title] / [step] markers removed."""
  text = text.strip().replace(" [title]", ". ")
  text = re.sub(r"\[.*?\]", "", text)
  return text.replace("  ", " ")


def _from_generic(record, where, context_field, choices_field, gold_field):
  choices = data.nested_field(record, choices_field, where)
  if not isinstance(choices, list):
    raise ConfigError(f"field {choices_field!r} in {where} must be a list of strings")
  return MultipleChoiceExample(
      context=str(data.nested_field(record, context_field, where)), choices=tuple(choices),
      gold=_index(data.nested_field(record, gold_field, where), len(choices), where),
      continuation=record.get("continuation"))


def _from_hellaswag(record, where):
  if "ctx_a" in record and "ctx_b" in record:  # the original JSONL, as the harness builds it
    context = record["ctx_a"] + " " + record["ctx_b"].capitalize()
  else:  # `ctx`, or TFDS's `context`
    context = record["ctx"] if "ctx" in record else data.nested_field(record, "context", where)
  if record.get("activity_label"):
    context = f"{record['activity_label']}: {context}"
  endings = data.nested_field(record, "endings", where)
  return MultipleChoiceExample(
      context=_hellaswag_text(context),
      choices=tuple(" " + _hellaswag_text(e) for e in endings),
      gold=_index(data.nested_field(record, "label", where), len(endings), where))


def _from_arc(record, where):
  question = data.nested_field(record, "question", where)
  if isinstance(question, Mapping):  # the original ARC JSONL: {"stem", "choices": [{text, label}]}
    items = data.nested_field(question, "choices", where)
    texts, labels = [c["text"] for c in items], [c["label"] for c in items]
    question = question["stem"]
  else:  # the Hugging Face / TFDS layout: choices {"text": [...], "label": [...]}
    texts = data.nested_field(record, "choices/text", where)
    labels = data.nested_field(record, "choices/label", where)
  answer = data.nested_field(record, "answerKey", where)
  if answer not in labels:
    raise ConfigError(f"answerKey {answer!r} in {where} is not one of the labels {labels}")
  return MultipleChoiceExample(context=f"Question: {question}\nAnswer:",
                               choices=tuple(" " + t for t in texts), gold=labels.index(answer))


def _from_winogrande(record, where):
  sentence = data.nested_field(record, "sentence", where)
  if sentence.count("_") != 1:
    raise ConfigError(f"sentence in {where} must hold exactly one '_' blank: {sentence!r}")
  if "answer" in record:  # the original JSONL: "1" / "2"
    gold = _index(record["answer"], 2, where, base=1)
  else:  # TFDS: ClassLabel(names=["1", "2"]) -> 0 / 1
    gold = _index(data.nested_field(record, "label", where), 2, where)
  blank = sentence.index("_")
  return MultipleChoiceExample(
      context=sentence[:blank],
      choices=tuple(data.nested_field(record, option, where) for option in ("option1", "option2")),
      gold=gold, continuation=" " + sentence[blank + 1:].strip())


def _records_jsonl(path: pathlib.Path) -> Iterable[tuple[dict, str]]:
  with open(path, encoding="utf-8") as f:
    for line_number, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{line_number}"
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ConfigError(f"{where} is not a JSON line: {e.msg}") from None
      if not isinstance(record, dict):
        raise ConfigError(f"{where} holds a JSON {type(record).__name__}, not an object")
      yield record, where


def _records_tfds(name: str, split: str, data_dir: str | None) -> Iterable[tuple[dict, str]]:
  source = data._tfds_source(name, split, data_dir)  # ConfigError unless prepared locally
  for i in range(len(source)):
    yield _plain(source[i]), f"record {i} of TFDS {name!r} split {split!r}"


def task_source(spec: str | os.PathLike, *, format: str = "generic", limit: int | None = None
                ) -> tuple[str, Any]:
  """Where `load_task` reads from, ("jsonl", path) or ("tfds", name), after the checks it makes
  before reading anything (see `check_task` for the TFDS dataset being there too)."""
  if format not in FORMATS:
    raise ConfigError(f"task format={format!r} is not supported; allowed: {FORMATS}")
  if limit is not None and (not isinstance(limit, int) or limit <= 0):
    raise ConfigError(f"limit={limit!r} must be a positive integer or None")
  path = pathlib.Path(spec).expanduser()
  if str(spec).startswith(TFDS_PREFIX):
    return "tfds", str(spec)[len(TFDS_PREFIX):]
  if path.is_file():
    return "jsonl", path
  if path.suffix in _JSONL_SUFFIXES or path.is_dir():
    raise ConfigError(f"task file {str(spec)!r} does not exist or is a directory; allowed: a "
                      "JSONL file or the name of a locally prepared TFDS dataset")
  return "tfds", str(spec)


def check_task(spec: str | os.PathLike, *, format: str = "generic", split: str = "validation",
               data_dir: str | None = None, limit: int | None = None, **fields) -> None:
  """What `load_task` would refuse before its first record: a bad format or limit, a missing
  file, a TFDS dataset or split that is not prepared locally. Reads no record."""
  kind, where = task_source(spec, format=format, limit=limit)
  if kind == "tfds":
    data._tfds_source(where, split, data_dir)


def load_task(spec: str | os.PathLike, *, format: str = "generic", split: str = "validation",
              data_dir: str | None = None, context_field: str = "context",
              choices_field: str = "choices", gold_field: str = "gold",
              limit: int | None = None) -> list[MultipleChoiceExample]:
  """A multiple-choice task from a local JSONL file or a locally prepared TFDS dataset.

  spec: an existing file (one JSON object per line), or a TFDS name such as "hellaswag" or
    "ai2_arc/ARC-Challenge" (optionally prefixed "tfds:"), read from `split` under `data_dir`
    (array_record; never downloaded: a dataset that is not prepared raises ConfigError).
  format: how a record becomes an example, following lm-evaluation-harness's prompts:
    generic     context/choices/gold under the given field names ("a/b" reaches into nested
                objects; gold a 0-based index; an optional `continuation` field as in
                MultipleChoiceExample). Text is used as given: put delimiters in the data.
    hellaswag   `ctx` (or `ctx_a` + `ctx_b`, or TFDS's `context`), `endings`, `label`; prefixed
                with `activity_label` when present, WikiHow markers removed, choices " " + ending.
    arc         `question`, `choices: {text: [...], label: [...]}`, `answerKey`; context
                "Question: {question}\\nAnswer:", choices " " + text.
    winogrande  `sentence` with one "_", `option1`, `option2`, `answer` "1"/"2" (TFDS: `label`
                0/1); each option fills the blank and the rest of the sentence is scored.
  limit: keep only the first `limit` examples.
  """
  kind, where = task_source(spec, format=format, limit=limit)
  records = _records_jsonl(where) if kind == "jsonl" else _records_tfds(where, split, data_dir)
  convert: Callable[[dict, str], MultipleChoiceExample] = {
      "generic": functools.partial(_from_generic, context_field=context_field,
                                   choices_field=choices_field, gold_field=gold_field),
      "hellaswag": _from_hellaswag, "arc": _from_arc, "winogrande": _from_winogrande,
  }[format]
  examples = []
  for record, where in records:
    if limit is not None and len(examples) >= limit:
      break
    try:
      examples.append(convert(record, where))
    except ConfigError as e:
      if where in str(e):
        raise
      raise ConfigError(f"{where}: {e}") from None
    except (KeyError, TypeError, AttributeError) as e:
      raise ConfigError(f"{where} does not fit format={format!r}: {type(e).__name__} {e}") from None
  if not examples:
    raise ConfigError(f"task {str(spec)!r} has no examples")
  return examples
