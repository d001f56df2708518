r"""Paper Tables 1 and 11: depth vs width pruning to the same size, before and after retraining.

The shipped stdlib teacher (4 layers, hidden 128, 8 heads in 4 groups, MLP 512; 1,049,728
parameters) is pruned to ~558k parameters three ways, each distilled from the teacher for the same
steps on the same batches, then scored on the embedded next-line task:
  depth        drop 2 of 4 layers (Block Importance)                557,696 parameters
  width_mlp    MLP 512 -> 192 in every layer                        558,208
  width_mixed  hidden 128 -> 112 and MLP 512 -> 240                 552,944
and depth once more with another data order, for the spread between two runs of one setting.

  python experiments/sweep.py --sweep=experiments/sweeps/depth_vs_width.py
  python experiments/sweep.py --sweep=experiments/sweeps/depth_vs_width.py:runlocal  (smoke size)
"""

import math
import pathlib

import ml_collections

from minitron_jax import run_config, sweep_report

TITLE = "Depth vs width pruning (Tables 1, 11)"
FINDING = ("Width pruning has a higher loss than depth pruning right after pruning, but a lower "
           "loss after retraining (and better downstream accuracy).")

TEACHER = dict(num_layers=4, hidden_size=128, num_attention_heads=8, num_key_value_heads=4,
               intermediate_size=512)
SPREAD_POINT = "depth,data_seed=1"
TARGETS = {
    "depth": dict(TEACHER, num_layers=2),
    "width_mlp": dict(TEACHER, intermediate_size=192),
    "width_mixed": dict(TEACHER, hidden_size=112, intermediate_size=240),
}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  options = run_config.parse_arg(arg)
  config = run_config.base_config()
  config.stages = ("importance", "prune", "distill", "evaluate")
  config.distill.update(steps=600, eval_every=50, checkpoint_every=200)
  if "runlocal" in options:
    run_config.runlocal(config)
  return config


def get_hyper(h, config):
  del config  # the same points at every size
  return h.chain([
      *(h.named(name, {"config.prune.target": target}) for name, target in TARGETS.items()),
      h.named(SPREAD_POINT, {"config.prune.target": TARGETS["depth"], "config.data.seed": 1}),
  ])


def summarize(results: sweep_report.SweepResults, out: pathlib.Path) -> sweep_report.Section:
  rows, curves, after, before = [], {}, {}, {}
  teacher_loss = None
  for name, point in results.points.items():
    prune, distill = point.prune, point.distill
    distilled = point.evaluation.get("distilled", {})
    accuracy, examples = distilled.get("next_line/acc"), distilled.get("next_line/num_examples")
    if accuracy is not None and examples:
      accuracy = f"{accuracy:.3f} ± {math.sqrt(accuracy * (1 - accuracy) / examples):.3f}"
    teacher_loss = prune["source_validation_loss"]
    before[name], after[name] = prune["pruned_validation_loss"], distill["val_ce"]
    rows.append((name, f"{prune['pruned_params']:,}", before[name], after[name], accuracy))
    curves[name] = point.curve()
  first = next(iter(results.points.values()))
  teacher_accuracy = first.evaluation.get("teacher", {}).get("next_line/acc", float("nan"))
  steps = first.distill["steps"]
  table = sweep_report.markdown_table(
      ("pruning", "params", "val loss, zero-shot", f"val loss after {steps} KD steps",
       "next-line acc after KD (± s.e.)"), rows)
  table += (f"\n\nTeacher: {teacher_loss:.4f} validation loss, {teacher_accuracy:.3f} next-line "
            "accuracy.")

  width = [n for n in results.points if n.startswith("width")]
  spread = abs(after[SPREAD_POINT] - after["depth"]) if SPREAD_POINT in after else 0.0
  zero_shot = [n for n in width if before[n] > before["depth"]]
  retrained = [n for n in width if after["depth"] - after[n] > spread]
  verdict = (f"right after pruning, {len(zero_shot)}/{len(width)} width variants have a higher "
             f"loss than depth; after retraining {len(retrained)}/{len(width)} are lower by more "
             f"than the spread between two depth runs ({spread:.4f}). ")
  if zero_shot == width and retrained == width:
    verdict += "Agrees with the paper."
  elif retrained == width:
    verdict += ("Agrees after retraining, the paper's main point; disagrees right after pruning, "
                "where width is already ahead here.")
  else:
    verdict += "Disagrees with the paper after retraining."

  plots = [sweep_report.plot_lines(
      out / "depth_vs_width_curves.png", curves, title="Depth vs width: validation loss",
      xlabel="distillation step (0 = pruned, zero-shot)", ylabel="validation loss (nats/byte)",
      hlines={"teacher": teacher_loss}, ylim=(teacher_loss - 0.05, max(before.values()) + 0.1))]
  depth = results["depth"].scores
  layers = list(range(len(depth.block_importance[1])))
  series = {"Block Importance (1 - cos)": (layers, list(depth.block_importance[1]))}
  if 1 in depth.drop_loss:
    series["loss increase when dropped"] = (layers, list(depth.drop_loss[1]))
  plots.append(sweep_report.plot_lines(
      out / "depth_vs_width_layer_importance.png", series,
      title="Teacher layer importance", xlabel="layer", ylabel="importance"))
  return sweep_report.Section(table, verdict, tuple(plots))
