r"""Turns sweep outputs into experiments/RESULTS.md: each sweep's summarize() writes its table,
verdict and plots (experiments/results/NAME.json and PNGs), then the page is rendered from every
kept section. experiments/sweep.py calls this after a sweep; run it alone to re-summarise runs
already on disk:

  python experiments/results.py --root=/tmp/minitron-sweeps            (every sweep found there)
  python experiments/results.py --root=/tmp/minitron-sweeps --sweeps=aggregation
"""

import os
import pathlib
import sys

from absl import app, flags, logging

from minitron_jax import sweep, sweep_report
from minitron_jax.config import ConfigError

EXPERIMENTS = pathlib.Path(__file__).resolve().parent
# The page's sections, in the order of METHOD §7.
ORDER = ("depth_vs_width", "aggregation", "iterative_importance", "kd_vs_ce_vs_random",
         "loss_functions", "ranking_stability")
INTRO = """\
Each section is one sweep in `experiments/sweeps/` (an ml-collections config per paper table and a
`get_hyper` sweep over it) run on the teacher this project trains and ships: a byte-level
Llama-style decoder with 4 layers, hidden 128, 8 query heads in 4 groups, MLP 512 and 1.05M
parameters, trained on the Python standard library's source (`experiments/train_tiny_teacher.py`).
Losses are nats per byte on the held-out validation split of that corpus. The paper worked with
15B and 8B models and billions of tokens; what can carry over to this scale is the direction of a
finding, which is what each section checks. The command under each section reruns it and rewrites
its numbers and plots; nothing on this page is typed in by hand except the notes under a table
(`experiments/results/NAME.md`)."""

DEFAULT_RESULTS = EXPERIMENTS / "results"
DEFAULT_PAGE = EXPERIMENTS / "RESULTS.md"

# Shared with experiments/sweep.py, which imports this module.
ROOT = flags.DEFINE_string("root", "/tmp/minitron-sweeps", "Where sweep runs write.")
RESULTS = flags.DEFINE_string("results", str(DEFAULT_RESULTS),
                              "Directory of the kept sections (NAME.json, plots).")
PAGE = flags.DEFINE_string("page", str(DEFAULT_PAGE), "The page to render.")
_SWEEPS = flags.DEFINE_list("sweeps", [], "experiments/results.py only: sweep names to "
                            "re-summarise (default: every one under --root).")


def refresh(spec: str, directory: pathlib.Path, results_dir: pathlib.Path,
            page: pathlib.Path) -> dict:
  """Re-summarises one sweep (its file `spec`, its runs in `directory`) and re-renders the page."""
  _, module, _ = sweep.load(spec)
  record = sweep_report.write_section(module, sweep_report.read(directory), results_dir)
  image_dir = os.path.relpath(results_dir.absolute(), page.absolute().parent)
  page.write_text(sweep_report.render(results_dir, ORDER, intro=INTRO, image_dir=image_dir))
  return record


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  root = pathlib.Path(ROOT.value)
  names = _SWEEPS.value or [n for n in ORDER if (root / n / "sweep.json").exists()]
  try:
    unknown = sorted(set(names) - set(ORDER))
    if unknown:
      raise ConfigError(f"sweeps {unknown} are unknown; known: {list(ORDER)}")
    if not names:
      raise ConfigError(f"no sweep outputs under {root}; run experiments/sweep.py first")
    for name in names:
      record = refresh(str(EXPERIMENTS / "sweeps" / f"{name}.py"), root / name,
                       pathlib.Path(RESULTS.value), pathlib.Path(PAGE.value))
      print(f"{record['title']}: {record['verdict']}")
  except ConfigError as error:
    sys.exit(f"error: {error}")
  print(f"{PAGE.value} updated")


if __name__ == "__main__":
  app.run(main)
