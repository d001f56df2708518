r"""Paper Tables 1 and 11: depth vs width pruning to the same size, before and after retraining.

The shipped stdlib teacher (4 layers, hidden 128, 8 heads in 4 groups, MLP 512; 1,049,728
parameters) is pruned to ~558k parameters three ways, each distilled from the teacher for the same
steps on the same batches, then scored on the embedded next-line task:
  depth        drop 2 of 4 layers (Block Importance)                557,696 parameters
  width_mlp    MLP 512 -> 192 in every layer                        558,208
  width_mixed  hidden 128 -> 112 and MLP 512 -> 240                 552,944
Each runs three times, with data orders 0, 1 and 2 (calibration samples and training batches), so
the comparison after retraining is between means of three runs.

  python experiments/sweep.py --sweep=experiments/sweeps/depth_vs_width.py
  python experiments/sweep.py --sweep=experiments/sweeps/depth_vs_width.py:runlocal  (smoke size)
"""

import math
import pathlib

import ml_collections

from minitron_jax.run import run_config
from minitron_jax.tools import sweep_report

TITLE = "Depth vs width pruning (Tables 1, 11)"
FINDING = ("Width pruning has a higher loss than depth pruning right after pruning, but a lower "
           "loss after retraining (and better downstream accuracy).")

TEACHER = dict(num_layers=4, hidden_size=128, num_attention_heads=8, num_key_value_heads=4,
               intermediate_size=512)
TARGETS = {
    "depth": dict(TEACHER, num_layers=2),
    "width_mlp": dict(TEACHER, intermediate_size=192),
    "width_mixed": dict(TEACHER, hidden_size=112, intermediate_size=240),
}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  # Three data orders each pruning is retrained with.
  return run_config.sweep_config(arg, ("importance", "prune", "distill", "evaluate"),
                                 replicate_seeds=(0, 1, 2), steps=600, eval_every=50,
                                 checkpoint_every=200)


def get_hyper(h, config):
  return h.chain([
      *(h.named(name, {"config.prune.target": target}) for name, target in TARGETS.items()),
      *(h.named(f"{name},data_seed={seed}", {"config.prune.target": target,
                                             "config.data.seed": seed})
        for name, target in TARGETS.items() for seed in config.replicate_seeds if seed),
  ])


def summarize(results: sweep_report.SweepResults, out: pathlib.Path) -> sweep_report.Section:
  by_setting: dict[str, list] = {}
  for name, point in results.points.items():
    by_setting.setdefault(name.split(",")[0], []).append(point)
  first = next(iter(results.points.values()))
  teacher_loss = first.prune["source_validation_loss"]
  teacher_accuracy = first.evaluation.get("teacher", {}).get("next_line/acc", float("nan"))
  steps = first.distill["steps"]

  rows, before, after, mean_accuracy = [], {}, {}, {}
  for setting, points in by_setting.items():
    before[setting] = sweep_report.mean_and_error(
        [p.prune["pruned_validation_loss"] for p in points])
    runs = [p.distill["val_ce"] for p in points]
    after[setting] = sweep_report.mean_and_error(runs)
    accuracies = [p.evaluation.get("distilled", {}).get("next_line/acc") for p in points]
    accuracy = sweep_report.mean_and_error([a for a in accuracies if a is not None] or [math.nan])
    mean_accuracy[setting] = accuracy[0]
    rows.append((setting, f"{points[0].prune['pruned_params']:,}", f"{before[setting][0]:.4f}",
                 " / ".join(f"{v:.4f}" for v in runs),
                 f"{after[setting][0]:.4f} ± {after[setting][1]:.4f}",
                 f"{accuracy[0]:.3f} ± {accuracy[1]:.3f}"))
  table = sweep_report.markdown_table(
      ("pruning", "params", "val loss, zero-shot (mean)",
       f"val loss after {steps} KD steps, each run", "mean ± s.e.",
       "next-line acc after KD, mean ± s.e."), rows)
  table += (f"\n\nTeacher: {teacher_loss:.4f} validation loss, {teacher_accuracy:.3f} next-line "
            f"accuracy (200 examples: one run's accuracy has a standard error of about 0.033).")

  width = [n for n in by_setting if n.startswith("width")]
  zero_shot = [n for n in width if before[n][0] > before["depth"][0]]
  # depth minus width, paired by data seed (same calibration samples and batches).
  gaps = {n: sweep_report.paired_difference(by_setting["depth"], by_setting[n],
                                            lambda p: p.distill["val_ce"])[:2] for n in width}
  retrained = [n for n, (gap, error) in gaps.items() if gap > 2 * error]
  verdict = (f"right after pruning, {len(zero_shot)}/{len(width)} width variants have a higher "
             f"loss than depth; after retraining they are lower than depth, paired by data seed, "
             "by " + ", ".join(f"{gap:.4f} ± {error:.4f} ({n})" for n, (gap, error) in gaps.items())
             + f": beyond two standard errors for {len(retrained)}/{len(width)}. ")
  ahead = [n for n in width if mean_accuracy[n] > mean_accuracy["depth"]]
  verdict += (f"Next-line accuracy after KD is higher than depth's for {len(ahead)}/{len(width)} "
              "width variants (" + ", ".join(f"{n} {mean_accuracy[n]:.3f}" for n in by_setting)
              + "). ")
  misses = [part for part, held in (
      ("right after pruning (width is already ahead there)", zero_shot == width),
      ("on next-line accuracy (depth is ahead there)", ahead == width)) if not held]
  agreement = ("disagrees" if retrained != width else "in part" if misses else "agrees")
  if agreement == "agrees":
    verdict += "Agrees with the paper."
  elif agreement == "in part":
    verdict += ("Agrees on the loss after retraining, the paper's main point; disagrees "
                + " and ".join(misses) + ".")
  else:
    verdict += "Does not reproduce the paper's advantage of width after retraining."

  curves = {setting: points[0].curve() for setting, points in by_setting.items()}
  plots = [sweep_report.plot_lines(
      out / "depth_vs_width_curves.png", curves, title="Depth vs width: validation loss (seed 0)",
      xlabel="distillation step (0 = pruned, zero-shot)", ylabel="validation loss (nats/byte)",
      hlines={"teacher": teacher_loss},
      ylim=(teacher_loss - 0.05, max(b[0] for b in before.values()) + 0.1))]
  depth = results["depth"].scores
  layers = list(range(len(depth.block_importance[1])))
  series = {"Block Importance (1 - cos)": (layers, list(depth.block_importance[1]))}
  if 1 in depth.drop_loss:
    series["loss increase when dropped"] = (layers, list(depth.drop_loss[1]))
  plots.append(sweep_report.plot_lines(
      out / "depth_vs_width_layer_importance.png", series,
      title="Teacher layer importance (depth pruning drops the two lowest)", xlabel="layer",
      ylabel="1 - cos  /  Δ loss (nats/byte)"))
  return sweep_report.Section(table, verdict, tuple(plots), agreement)
