"""The problems a run's settings have, gathered rather than raised: whole-run validation and
the plan's settings parsers note every one, so one bad setting hides no other."""

from __future__ import annotations

from typing import Any, Callable

from minitron_jax.errors import ConfigError


class Problems:
  """One "setting: message" line per problem, in the order found; a message reached from
  several places (the data section in every retraining, a target checked against several
  shapes) is kept once, under the first setting that found it."""

  def __init__(self):
    self.lines: list[str] = []
    self._messages: set[str] = set()

  def attempt(self, setting: str, function: Callable, *args, **kwargs) -> Any:
    """function(*args, **kwargs), or None after noting its ConfigError under `setting`."""
    try:
      return function(*args, **kwargs)
    except ConfigError as e:
      self.note(setting, str(e))
    except (TypeError, ValueError) as e:  # a value of the wrong type reaching a constructor
      self.note(setting, f"{type(e).__name__}: {e}")
    return None

  def note(self, setting: str, message: str) -> None:
    message = " ".join(message.split("\n"))
    if message not in self._messages:
      self._messages.add(message)
      self.lines.append(f"{setting}: {message}")

  def extend(self, lines) -> None:
    """Lines already "setting: message" (a stage's own checks)."""
    for line in lines:
      self.note(*line.split(": ", 1))

  def __bool__(self) -> bool:
    return bool(self.lines)


def error(problems: list[str]) -> ConfigError:
  """One ConfigError for all problems: the problem itself when there is one, else a count and
  one problem per line."""
  if len(problems) == 1:
    return ConfigError(problems[0])
  return ConfigError(f"{len(problems)} problems in the run's settings, nothing was run:\n"
                     + "\n".join(f"  {problem}" for problem in problems))
