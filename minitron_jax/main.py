"""Entry point: `python -m minitron_jax.main --config=configs/default.py --workdir=DIR`."""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from minitron_jax import pipeline
from minitron_jax.config import ConfigError

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
  except ConfigError as error:  # a user mistake: one line, no traceback
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
