"""The one error type for user mistakes: a setting, a file or an input the user gave, named in one
line with what is allowed. Entry points print it without a traceback and exit 2.

A leaf: raising it needs no model config, mesh or stage (before, modules imported config.py for it).
"""


class ConfigError(ValueError):
  """A user-facing configuration mistake; the message is one line naming the value and the rule."""
