"""Entry point: `python -m minitron_jax.main --config=configs/default.py --workdir=DIR`.

Exit codes: 0 done; 2 a setting or an input is wrong (one line per problem, nothing run or
written for a setting); 3 training diverged (the last good checkpoint is named); 143 stopped by
SIGTERM after saving (rerun the same command to resume).
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from minitron_jax import pipeline, preemption
from minitron_jax.config import ConfigError
from minitron_jax.distill import Diverged

EXIT_CONFIG = 2
EXIT_DIVERGED = 3

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml-collections config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for every output of the run.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # library INFO logs would bury the progress lines
    logging.set_verbosity(logging.WARNING)
  try:
    pipeline.run(_CONFIG.value, _WORKDIR.value)
  except ConfigError as error:  # a user mistake or a bad input file: no traceback
    print(f"error: {error}", file=sys.stderr)
    sys.exit(EXIT_CONFIG)
  except Diverged as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(EXIT_DIVERGED)
  except preemption.Preempted as stopped:
    print(f"preempted: {stopped}", file=sys.stderr)
    sys.exit(preemption.EXIT_CODE)


if __name__ == "__main__":
  app.run(main)
