r"""Runs one ablation sweep (experiments/sweeps/NAME.py), then refreshes its section of
experiments/RESULTS.md (numbers in experiments/results/NAME.json, plots beside them).

  python experiments/sweep.py --sweep=experiments/sweeps/depth_vs_width.py
  python experiments/sweep.py --sweep=experiments/sweeps/aggregation.py:runlocal --root=/tmp/s

A killed sweep resumes: rerun the same command (finished stages of every point are skipped).
"""

import pathlib
import sys

from absl import app, flags, logging

import results  # experiments/results.py, beside this file
from minitron_jax.tools import sweep
from minitron_jax.errors import ConfigError

_SWEEP = flags.DEFINE_string("sweep", None, "experiments/sweeps/NAME.py[:runlocal]", required=True)
_ONLY_POINTS = flags.DEFINE_list("points", [], "Run only these points (results not refreshed).")


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:  # library INFO logs would bury the progress lines
    logging.set_verbosity(logging.WARNING)
  try:
    directory = sweep.run(_SWEEP.value, results.ROOT.value, only=_ONLY_POINTS.value)
    if _ONLY_POINTS.value:
      return
    record = results.refresh(_SWEEP.value, directory, pathlib.Path(results.RESULTS.value),
                             pathlib.Path(results.PAGE.value))
    print(f"{record['title']}: {record['verdict']}\n{record['page']} updated")
  except ConfigError as error:
    sys.exit(f"error: {error}")


if __name__ == "__main__":
  app.run(main)
