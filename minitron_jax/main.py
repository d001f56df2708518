"""Entry point: `python -m minitron_jax.main --config=configs/default.py --workdir=DIR`.

Multi-process (one process per host): add `--coordinator_address=HOST:PORT --num_processes=N
--process_id=I` on every process, or nothing under SLURM, Open MPI or on a TPU pod, where JAX
reads them from the environment. Every process takes the same flags otherwise; `--workdir` must be
on a file system they all see.

Exit codes: 0 done; 2 a setting or an input is wrong (one line per problem, nothing run or
written for a setting); 3 training diverged (the last good checkpoint is named); 143 stopped by
SIGTERM after saving (rerun the same command to resume).
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from minitron_jax import distributed, pipeline, preemption
from minitron_jax.config import ConfigError
from minitron_jax.distill import Diverged

EXIT_CONFIG = 2
EXIT_DIVERGED = 3

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml-collections config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for every output of the run.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for a multi-process run.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, from 0.")
flags.mark_flags_as_required(["config", "workdir"])


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
