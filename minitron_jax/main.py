"""Entry point: `python -m minitron_jax.main --config=configs/default.py --workdir=DIR`.

Multi-process (one process per host): add `--coordinator_address=HOST:PORT --num_processes=N
--process_id=I` on every process, or nothing under SLURM, Open MPI or on a TPU pod, where JAX
reads them from the environment. Every process takes the same flags otherwise; `--workdir` must be
on a file system they all see.

Exit codes: 0 done; 2 a setting, a flag or an input is wrong (one line per problem, nothing run
or written for a setting; a `--config.PATH` naming no setting is one too); 3 training diverged
(the last good checkpoint is named); 143 stopped by SIGTERM after saving (rerun the same command
to resume).
"""

import os
import re
import sys
from typing import NoReturn

from absl import app, flags, logging

from minitron_jax.core import optional

with optional.exit_when_missing("the main job (python -m minitron_jax.main)"):
  import ml_collections
  from ml_collections import config_flags

  from minitron_jax.core import distributed, preemption
  from minitron_jax.run import pipeline, problems as problems_lib, run_config
  from minitron_jax.errors import ConfigError
  from minitron_jax.training.loop import Diverged

EXIT_CONFIG = 2
EXIT_DIVERGED = 3

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml-collections config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for every output of the run.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for a multi-process run.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, from 0.")
# Required, but checked in parse_flags rather than by absl's mark_flags_as_required: its validators
# would run whenever any library parses absl flags after importing this module (tokamax does, on
# its first kernel call), and fail there.
_REQUIRED = ("config", "workdir")
_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=]+)")
_CONFIG_FILE = re.compile(r"^--?config(?:=(.*))?$")


_HELP = ("-h", "-?", "--help", "--helpshort", "--helpfull")


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a mistake on the command line answered in one line and exit 2."""
  asked = [arg for arg in argv[1:] if arg in _HELP]
  if asked:  # absl's own help flags print the flags and exit 1
    print(__doc__)
    print(flags.FLAGS.get_help() if "--helpfull" in asked else flags.FLAGS.main_module_help())
    sys.exit(0)
  try:
    parsed = flags.FLAGS(argv)
  except flags.Error as error:  # a value of the wrong type or an unknown flag
    _exit(EXIT_CONFIG, f"error: {error}")
  except (KeyError, AttributeError, OSError):
    # ml_collections raises these, with a traceback, for a --config.PATH naming no setting and
    # for a config file that does not exist (without overrides, at the config's first use).
    _refuse(argv)
    raise
  missing = [f"--{name}" for name in _REQUIRED if not flags.FLAGS[name].present]
  if missing:
    _exit(EXIT_CONFIG, f"error: {' and '.join(missing)} must be given; allowed: --config=FILE "
          "(e.g. configs/default.py) and --workdir=DIRECTORY")
  if not isinstance(_CONFIG.value, ml_collections.ConfigDict):
    _refuse(argv)
  return parsed


def _refuse(argv: list[str]) -> None:
  problems = command_line_problems(argv)
  if problems:
    _exit(EXIT_CONFIG, f"error: {problems_lib.error(problems)}")


def command_line_problems(argv: list[str]) -> list[str]:
  """A --config file that does not exist, or the --config.PATH overrides that name no setting
  of the config file's config (one line each)."""
  argv = flags.FLAGS.read_flags_from_files(argv, force_gnu=False)
  for i, arg in enumerate(argv):
    match = _CONFIG_FILE.match(arg)
    if match and (match[1] is not None or i + 1 < len(argv)):
      argument = match[1] if match[1] is not None else argv[i + 1]
      break
  else:
    return []
  path = argument.split(":", 1)[0]
  if not os.path.isfile(path):
    return [f"--config={argument}: {path} is not a file; allowed: a config file such as "
            "configs/default.py"]
  config = flags.FLAGS["config"].parser.parse(argument)
  paths = dict.fromkeys(match[1] for match in map(_OVERRIDE.match, argv) if match)
  return run_config.unknown_settings(config, paths)


def _exit(code: int, line: str) -> NoReturn:
  print(line, file=sys.stderr)
  sys.exit(code)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # library INFO logs would bury the progress lines
    logging.set_verbosity(logging.WARNING)
  try:
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    log = print if distributed.is_primary() else (lambda line: None)
    pipeline.run(_CONFIG.value, _WORKDIR.value, log=log)
  except ConfigError as error:  # a user mistake or a bad input file: no traceback
    _exit(EXIT_CONFIG, f"error: {error}")
  except Diverged as error:
    _exit(EXIT_DIVERGED, f"error: {error}")
  except preemption.Preempted as stopped:
    _exit(preemption.EXIT_CODE, f"preempted: {stopped}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
