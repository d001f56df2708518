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

from minitron_jax import run_config, sweep_report

TITLE = "Aggregation metrics for activation importance (Table 15)"
FINDING = ("Zero-shot, (batch=l2, seq=mean) and (mean, mean) give a lower loss than (l2, l2) and "
           "than the variance-based aggregations.")

AGGREGATIONS = ("mean", "l2", "var")
WIDTH_TARGET = dict(num_layers=4, hidden_size=96, num_attention_heads=4, num_key_value_heads=4,
                    intermediate_size=256)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  options = run_config.parse_arg(arg)
  config = run_config.base_config()
  config.stages = ("importance", "prune")
  config.prune.target = ml_collections.ConfigDict(WIDTH_TARGET)
  config.prune.head_merging = False
  config.importance.update(drop_loss=False, block_sizes=(1,))  # width only: no layer ranking
  if "runlocal" in options:
    run_config.runlocal(config)
  return config


SPREAD_POINT = "batch=l2,seq=mean,calibration_seed=1"


def get_hyper(h, config):
  del config  # the same points at every size
  batch = h.chain([h.named(f"batch={a}", {"config.importance.batch_aggregation": a})
                   for a in AGGREGATIONS])
  seq = h.chain([h.named(f"seq={a}", {"config.importance.seq_aggregation": a})
                 for a in AGGREGATIONS])
  return h.chain([h.product([batch, seq]), h.named(SPREAD_POINT, {
      "config.importance.batch_aggregation": "l2", "config.importance.seq_aggregation": "mean",
      "config.data.seed": 1})])


def _pair(name: str) -> tuple[str, str]:
  batch, seq = (part.split("=")[1] for part in name.split(",")[:2])
  return batch, seq


def summarize(results: sweep_report.SweepResults, out: pathlib.Path) -> sweep_report.Section:
  loss = {_pair(name): point.prune["pruned_validation_loss"]
          for name, point in results.points.items() if name != SPREAD_POINT}
  replicate = (results[SPREAD_POINT].prune["pruned_validation_loss"]
               if SPREAD_POINT in results.points else loss[("l2", "mean")])
  spread = abs(replicate - loss[("l2", "mean")])
  teacher = next(iter(results.points.values())).prune["source_validation_loss"]
  best = min(loss, key=loss.get)
  rows = [(f"batch={b}", *(loss.get((b, s), float("nan")) for s in AGGREGATIONS))
          for b in AGGREGATIONS]
  table = sweep_report.markdown_table(
      ("zero-shot val loss", *(f"seq={s}" for s in AGGREGATIONS)), rows)
  table += (f"\n\nTeacher: {teacher:.4f}. Lowest: batch={best[0]}, seq={best[1]} "
            f"({loss[best]:.4f}). (l2, mean) on other calibration samples: {replicate:.4f}.")

  winners = [p for p in (("l2", "mean"), ("mean", "mean")) if p in loss]
  losers = [p for p in loss if p == ("l2", "l2") or "var" in p]
  held = [(w, other) for w in winners for other in losers if loss[other] - loss[w] > spread]
  total = len(winners) * len(losers)
  verdict = (f"{len(held)} of the {total} paper comparisons (each of (l2, mean) and (mean, mean) "
             f"against (l2, l2) and every var variant) hold by more than the {spread:.4f} that "
             "other calibration samples alone change the loss. ")
  agreement = ("agrees" if total and len(held) == total else "in part" if held else "disagrees")
  verdict += {"agrees": "Agrees with the paper.", "in part": "Agrees in part.",
              "disagrees": "Disagrees with the paper."}[agreement]

  plots = (sweep_report.plot_bars(
      out / "aggregation_zero_shot.png",
      {f"batch={b}": {f"seq={s}": loss[(b, s)] for s in AGGREGATIONS if (b, s) in loss}
       for b in AGGREGATIONS},
      title="Zero-shot loss after width pruning, by aggregation",
      ylabel="validation loss (nats/byte)", hline=("teacher", teacher),
      ylim=(teacher - 0.1, max(loss.values()) + 0.15)),)
  return sweep_report.Section(table, verdict, plots, agreement)
