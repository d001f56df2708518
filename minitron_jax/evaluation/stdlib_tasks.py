"""A multiple-choice task built from the standard library's source, so evaluation needs no download.

HellaSwag and friends have to be fetched, and a byte-level model trained on Python source scores
them at chance anyway. "Which line comes next?" over the held-out standard-library files (the
validation split of `corpus.split_of`, never trained on) is the same kind of test, scored the same
way (`evaluate.score_multiple_choice`), and it is present on every machine: a pruned or distilled
student can be compared with its teacher on a task the teacher has learnt something about.

An example (mode "line"): the context is the text of a file before a line, back to
`context_lines` non-empty lines, ending with a newline; the gold choice is that line; the
distractors are lines of similar UTF-8 length from other validation files. No distractor is
trivial (blank, `pass`, `else:`, punctuation), duplicates another choice, or occurs anywhere in
the gold line's file. Choices are whole lines with their indentation, without the newline.

How likely a line is on its own varies far more between lines of equal length (a table row against
a docstring sentence) than a context shifts it, so in mode "line" a model with little long-range
context mostly picks the intrinsically likeliest line. Mode "context" asks the reverse, the way
lm-evaluation-harness scores Winogrande: the choices are the contexts (the true one and those
before lines of other files) and the scored text is the same line for every choice, so its prior
cancels and only how well each context predicts it counts. The shipped teacher (1M parameters,
trained on 128-byte windows), scored with max_length=128 on 1000 validation examples of 4 choices:
mode "line" acc 0.30, acc_norm 0.33; mode "context" acc 0.61 (chance 0.25 for both). As the
harness does, the newline(s) ending a context are scored with the choice or continuation
(evaluate.encode_pair); before that rule (0.28, 0.30 and 0.67) they were context.

Everything is drawn from a seeded generator over files in a fixed order, so a seed gives the same
task on every run of the same Python version (each version ships different source).
"""

from __future__ import annotations

import bisect
import dataclasses

import numpy as np

from minitron_jax.inputs import corpus
from minitron_jax.errors import ConfigError
from minitron_jax.evaluation.mc_tasks import MultipleChoiceExample, write_jsonl  # noqa: F401 (re-exported)

SPLITS = ("train", "validation")
MODES = ("line", "context")
# Lines that carry (almost) no information about their file, whatever their context.
TRIVIAL_LINES = frozenset({
    "pass", "else:", "try:", "finally:", "return", "break", "continue", "raise", "return None",
    "return True", "return False", "except:", "@property", "@staticmethod", "@classmethod",
    '"""', "'''", "...", "}", "]", ")", "),", "],", "},", "))", "):", "])", "del", "yield",
})
MIN_LINE_CHARS = 8  # stripped characters a gold or distractor line needs
MIN_LINE_ALNUM = 4  # ... of which letters or digits
# Longer lines are left out, so a choice leaves room for context within a 128-token window.
MAX_LINE_BYTES = 96


@dataclasses.dataclass(frozen=True)
class _Line:
  file: int
  index: int  # line number - 1 in its file
  text: str  # without the trailing newline and trailing whitespace
  num_bytes: int


def is_unusable(line: str) -> bool:
  """True for lines that make no question: blank, keyword-only, punctuation, or over-long."""
  stripped = line.strip()
  return (stripped in TRIVIAL_LINES or len(stripped) < MIN_LINE_CHARS
          or sum(c.isalnum() for c in stripped) < MIN_LINE_ALNUM
          or len(line.encode("utf-8")) > MAX_LINE_BYTES)


def split_files(split: str = "validation") -> list[list[str]]:
  """The split's files as lists of lines (trailing whitespace removed), in a stable order."""
  if split not in SPLITS:
    raise ConfigError(f"split={split!r} is not supported; allowed: {SPLITS}")
  files = [f for f in corpus.stdlib_files() if corpus.split_of(f) == split]
  if not files:
    raise ConfigError(f"no standard library source found for split={split!r}")
  return [[line.rstrip() for line in f.read_bytes().decode("utf-8", errors="replace").splitlines()]
          for f in files]


def check_arguments(num_examples: int = 200, num_choices: int = 4, seed: int = 0,
                    split: str = "validation", *, mode: str = "line", context_lines: int = 8,
                    length_tolerance: float = 0.2) -> None:
  """The checks `next_line_task` makes on its arguments before reading any source file."""
  if not isinstance(num_examples, int) or num_examples <= 0:
    raise ConfigError(f"num_examples={num_examples!r} must be a positive integer")
  if not isinstance(num_choices, int) or num_choices < 2:
    raise ConfigError(f"num_choices={num_choices!r} must be an integer >= 2")
  if not isinstance(seed, int):
    raise ConfigError(f"seed={seed!r} must be an integer")
  if split not in SPLITS:
    raise ConfigError(f"split={split!r} is not supported; allowed: {SPLITS}")
  if mode not in MODES:
    raise ConfigError(f"mode={mode!r} is not supported; allowed: {MODES}")
  if not isinstance(context_lines, int) or context_lines < 2:
    raise ConfigError(f"context_lines={context_lines!r} must be an integer >= 2")
  if not length_tolerance > 0:
    raise ConfigError(f"length_tolerance={length_tolerance!r} must be positive")


def next_line_task(num_examples: int = 200, num_choices: int = 4, seed: int = 0,
                   split: str = "validation", *, mode: str = "line", context_lines: int = 8,
                   length_tolerance: float = 0.2) -> list[MultipleChoiceExample]:
  """`num_examples` "which line comes next" questions with `num_choices` choices each.

  mode: "line" (choose the line that follows the context) or "context" (choose the context the
    line follows; the examples then have an empty `context`, the candidate contexts as choices
    and the line as `continuation`). See the module docstring.
  context_lines: non-empty lines of context before the gold line (fewer at the top of a file,
    but at least two); blank lines between them are kept, and the context ends with a newline.
  length_tolerance: mode "line" draws distractors among lines whose UTF-8 length is within this
    fraction (at least 2 bytes) of the gold line's; the window doubles until enough qualify.
  The gold choice's position is drawn uniformly, so chance accuracy is 1 / num_choices.
  """
  check_arguments(num_examples, num_choices, seed, split, mode=mode, context_lines=context_lines,
                  length_tolerance=length_tolerance)
  files = split_files(split)

  # The files each stripped text appears in (nothing from the gold's file may be a distractor),
  # gold candidates (usable lines after at least two non-empty ones), and the distractor pool:
  # one entry per distinct usable text, sorted by length.
  files_of: dict[str, set[int]] = {}
  candidates: list[_Line] = []
  first_seen: dict[str, _Line] = {}
  for f, lines in enumerate(files):
    non_empty = 0
    for i, text in enumerate(lines):
      files_of.setdefault(text.strip(), set()).add(f)
      if not is_unusable(text):
        line = _Line(f, i, text, len(text.encode("utf-8")))
        first_seen.setdefault(text, line)
        if non_empty >= 2:
          candidates.append(line)
      non_empty += bool(text.strip())
  pool = sorted(first_seen.values(), key=lambda l: (l.num_bytes, l.file, l.index))
  if len(candidates) < num_examples:
    raise ConfigError(f"num_examples={num_examples} is more than the {len(candidates)} lines the "
                      f"{split} split offers")

  def context_of(line: _Line) -> str:
    lines = files[line.file]
    start, seen = line.index, 0
    while start > 0 and seen < context_lines:
      start -= 1
      seen += bool(lines[start].strip())
    return "\n".join(lines[start:line.index]) + "\n"

  rng = np.random.default_rng(seed)
  examples = []
  for pick in sorted(rng.choice(len(candidates), size=num_examples, replace=False)):
    gold = candidates[pick]
    if mode == "line":
      others = _distractor_lines(gold, pool, files_of, num_choices - 1, length_tolerance, rng)
    else:
      others = [context_of(line) for line in _distractor_places(
          gold, candidates, files_of, num_choices - 1, rng)]
    position = int(rng.integers(num_choices))
    if mode == "line":
      choices = others[:position] + [gold.text] + others[position:]
      examples.append(MultipleChoiceExample(context_of(gold), tuple(choices), position))
    else:
      choices = others[:position] + [context_of(gold)] + others[position:]
      examples.append(MultipleChoiceExample("", tuple(choices), position, continuation=gold.text))
  return examples


def _distractor_lines(gold: _Line, pool: list[_Line], files_of: dict[str, set[int]], count: int,
                      tolerance: float, rng: np.random.Generator) -> list[str]:
  """`count` distinct lines of about the gold's length that never occur in the gold's file."""
  lengths = [l.num_bytes for l in pool]  # ascending
  gold_key = gold.text.strip()
  while True:
    slack = max(2, int(gold.num_bytes * tolerance))
    lo = bisect.bisect_left(lengths, gold.num_bytes - slack)
    hi = bisect.bisect_right(lengths, gold.num_bytes + slack)
    chosen, keys = [], {gold_key}
    for i in rng.permutation(np.arange(lo, hi)):
      key = pool[i].text.strip()
      if key not in keys and gold.file not in files_of[key]:
        chosen.append(pool[i].text)
        keys.add(key)
        if len(chosen) == count:
          return chosen
    if lo == 0 and hi == len(pool):
      raise ConfigError(f"num_choices={count + 1} needs more distinct lines than the split has")
    tolerance *= 2


def _distractor_places(gold: _Line, candidates: list[_Line], files_of: dict[str, set[int]],
                       count: int, rng: np.random.Generator) -> list[_Line]:
  """`count` lines of distinct other files, none of which holds the gold line's text."""
  excluded = files_of[gold.text.strip()] | {gold.file}
  chosen: list[_Line] = []
  for i in rng.permutation(len(candidates)):
    line = candidates[i]
    if line.file not in excluded:
      chosen.append(line)
      excluded = excluded | {line.file}
      if len(chosen) == count:
        return chosen
  raise ConfigError(f"num_choices={count + 1} needs more files than the split has "
                    f"({len(set(l.file for l in candidates))})")
