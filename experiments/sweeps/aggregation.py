r"""Paper Table 15: how activations are aggregated over the batch and the sequence, zero-shot.

Every (batch, sequence) pair of {mean, l2, var} ranks the heads, neurons and embedding channels
of the shipped stdlib teacher, which is then pruned in width only (hidden 128 -> 96, 8 -> 4 query
heads, MLP 512 -> 256; 443,232 of 1,049,728 parameters) and scored without retraining. Head
merging is off so that the scores alone decide what is kept. (l2, mean) runs once more on other
calibration samples, for the spread that sampling alone causes.

  python experiments/sweep.py --sweep=experiments/sweeps/aggregation.py
  python experiments/sweep.py --sweep=experiments/sweeps/aggregation.py:runlocal  (smoke size)
"""

import pathlib

import ml_collections

from minitron_jax.run import run_config
from minitron_jax.tools import sweep_report

TITLE = "Aggregation metrics for activation importance (Table 15)"
FINDING = ("Zero-shot, (batch=l2, seq=mean) and (mean, mean) give a lower loss than (l2, l2) and "
           "than the variance-based aggregations.")

AGGREGATIONS = ("mean", "l2", "var")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  # Three calibration sets (data seeds) per aggregation.
  config = run_config.sweep_config(arg, ("importance", "prune"), width_only=True,
                                   target=run_config.STDLIB_WIDTH_TARGET, replicate_seeds=(0, 1, 2))
  config.prune.head_merging = False
  return config


def get_hyper(h, config):
  batch = h.chain([h.named(f"batch={a}", {"config.importance.batch_aggregation": a})
                   for a in AGGREGATIONS])
  seq = h.chain([h.named(f"seq={a}", {"config.importance.seq_aggregation": a})
                 for a in AGGREGATIONS])
  seed = h.chain([h.named(f"calibration_seed={s}" if s else "", {"config.data.seed": s})
                  for s in config.replicate_seeds])
  return h.product([batch, seq, seed])


def _pair(name: str) -> tuple[str, str]:
  batch, seq = (part.split("=")[1] for part in name.split(",") if part.split("=")[0] in
                ("batch", "seq"))
  return batch, seq


def summarize(results: sweep_report.SweepResults, out: pathlib.Path) -> sweep_report.Section:
  runs: dict[tuple[str, str], list] = {}
  for name, point in results.points.items():
    runs.setdefault(_pair(name), []).append(point)
  def loss_of(point):
    return point.prune["pruned_validation_loss"]
  loss = {pair: sweep_report.mean_and_error([loss_of(p) for p in points])
          for pair, points in runs.items()}
  seeds = max(len(points) for points in runs.values())
  teacher = next(iter(results.points.values())).prune["source_validation_loss"]
  best = min(loss, key=lambda pair: loss[pair][0])
  rows = [(f"batch={b}", *(f"{loss[(b, s)][0]:.4f} ± {loss[(b, s)][1]:.4f}" if (b, s) in loss
                           else "" for s in AGGREGATIONS)) for b in AGGREGATIONS]
  table = sweep_report.markdown_table(
      (f"zero-shot val loss, mean ± s.e. of {seeds} calibration sets",
       *(f"seq={s}" for s in AGGREGATIONS)), rows)
  table += (f"\n\nTeacher: {teacher:.4f}. Lowest: batch={best[0]}, seq={best[1]}. Each "
            "calibration set is 256 samples of 128 bytes drawn with its own data seed.")

  # Each paper comparison, paired by calibration set: loser minus winner against 2 s.e.
  winners = [p for p in (("l2", "mean"), ("mean", "mean")) if p in runs]
  losers = [p for p in runs if p == ("l2", "l2") or "var" in p]
  gaps = {(w, other): sweep_report.paired_difference(runs[other], runs[w], loss_of)[:2]
          for w in winners for other in losers}
  held = [k for k, (gap, error) in gaps.items() if gap > 2 * error]
  reversed_ = [k for k, (gap, error) in gaps.items() if -gap > 2 * error]
  verdict = (f"of the {len(gaps)} paper comparisons (each of (l2, mean) and (mean, mean) against "
             f"(l2, l2) and every var variant), paired by calibration set, {len(held)} hold "
             f"beyond two standard errors, {len(reversed_)} go the other way ("
             + "; ".join(f"({o[0]}, {o[1]}) beats ({w[0]}, {w[1]})" for w, o in reversed_)
             + ") and the rest are ties. ")
  agreement = ("agrees" if gaps and len(held) == len(gaps) else "in part" if held else
               "disagrees")
  verdict += {"agrees": "Agrees with the paper.", "in part": "Agrees in part.",
              "disagrees": "Disagrees with the paper."}[agreement]

  plots = (sweep_report.plot_bars(
      out / "aggregation_zero_shot.png",
      {f"batch={b}": {f"seq={s}": loss[(b, s)][0] for s in AGGREGATIONS if (b, s) in loss}
       for b in AGGREGATIONS},
      title=f"Zero-shot loss after width pruning, by aggregation (mean of {seeds})",
      ylabel="validation loss (nats/byte)", hline=("teacher", teacher),
      ylim=(teacher - 0.1, max(m for m, _ in loss.values()) + 0.15)),)
  return sweep_report.Section(table, verdict, plots, agreement)
