r"""Paper Table 10: iterative importance (re-estimate between T pruning rounds) vs one-shot.

The shipped stdlib teacher is pruned in width (hidden 128 -> 96, 8 -> 4 query heads, MLP
512 -> 256; 443,232 of 1,049,728 parameters) in T = 1, 2 or 4 rounds, each round re-estimating
importance on the partly pruned model, then distilled for the same steps. A second T = 1 run with
another data order measures how much two runs of the same setting differ.

  python experiments/sweep.py --sweep=experiments/sweeps/iterative_importance.py
  python experiments/sweep.py --sweep=experiments/sweeps/iterative_importance.py:runlocal
"""

import pathlib

import ml_collections

from minitron_jax.run import run_config
from minitron_jax.tools import sweep_report

TITLE = "Iterative importance (Table 10)"
FINDING = ("Re-estimating importance between pruning rounds (T > 1) gives no gain over one-shot "
           "importance once the pruned model is retrained.")

ROUNDS = (1, 2, 4)
SPREAD_POINT = "T=1,data_seed=1"


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  return run_config.sweep_config(arg, ("importance", "prune", "distill"), width_only=True,
                                 target=run_config.STDLIB_WIDTH_TARGET, steps=300, eval_every=50,
                                 checkpoint_every=150)


def get_hyper(h, config):
  del config  # the same points at every size
  return h.chain([
      *(h.named(f"T={t}", {"config.prune.iterative_rounds": t}) for t in ROUNDS),
      h.named(SPREAD_POINT, {"config.prune.iterative_rounds": 1, "config.data.seed": 1}),
  ])


def summarize(results: sweep_report.SweepResults, out: pathlib.Path) -> sweep_report.Section:
  rows, curves, after = [], {}, {}
  for name, point in results.points.items():
    after[name] = point.distill["val_ce"]
    rows.append((name, point.prune["pruned_validation_loss"], after[name]))
    curves[name] = point.curve()
  first = next(iter(results.points.values()))
  steps, teacher = first.distill["steps"], first.prune["source_validation_loss"]
  table = sweep_report.markdown_table(
      ("rounds", "val loss, zero-shot", f"val loss after {steps} KD steps"), rows)
  table += f"\n\nTeacher: {teacher:.4f}."

  one_shot = after["T=1"]
  spread = abs(after[SPREAD_POINT] - one_shot) if SPREAD_POINT in after else 0.0
  iterative = {n: v for n, v in after.items() if n.startswith("T=") and n not in ("T=1",
                                                                                  SPREAD_POINT)}
  gains = {n: one_shot - v for n, v in iterative.items()}  # positive: better than one-shot
  beyond = [n for n, gain in gains.items() if gain > spread]
  verdict = ("after retraining, " + ", ".join(f"{n} ends {v - one_shot:+.4f} from T=1" for n, v in
                                              iterative.items())
             + f" (negative = better); two T=1 runs with different data order differ by "
             f"{spread:.4f}. ")
  verdict += ("Agrees with the paper: no gain beyond run-to-run spread." if not beyond else
              f"Disagrees with the paper: {', '.join(beyond)} gain more than that spread.")

  plots = (sweep_report.plot_lines(
      out / "iterative_importance_curves.png", curves,
      title="Iterative vs one-shot importance", xlabel="distillation step (0 = pruned)",
      ylabel="validation loss (nats/byte)", hlines={"teacher": teacher},
      ylim=(teacher - 0.05, max(v[1][0] for v in curves.values()) + 0.1)),)
  return sweep_report.Section(table, verdict, plots, "disagrees" if beyond else "agrees")
