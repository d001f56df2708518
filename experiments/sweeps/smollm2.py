r"""SmolLM2-135M, a real pretrained model: what recovers best after pruning, at equal tokens.

Every point prunes the same teacher with the same importance scores and retrains on the same
batches of the stdlib corpus (the model's own tokenizer) for the same steps:
  width_kd          the configs/smollm2_135m.py default, run whole (check ... report): its
                    DEFAULT_TARGET, logit KD from the teacher
  depth_kd          15 of 30 layers, the same parameter count, KD; layers ranked by the loss
                    increase when each is dropped, which the zero-shot table shows is far better
                    than Block Importance at this depth (5.92 vs 9.78)
  width_ce          the default target, next-token cross-entropy instead of KD
  width_random_ce   the default target from random weights, cross-entropy
  heads_kd          9 -> 6 query heads (one per group) and MLP 1024, head merging off, KD
  heads_merging_kd  the same with the paper's head merging on

  python experiments/sweep.py --sweep=experiments/sweeps/smollm2.py
  python experiments/sweep.py --sweep=experiments/sweeps/smollm2.py:runlocal  (smoke size)
"""

import importlib.util
import math
import pathlib

import ml_collections

from minitron_jax.tools import sweep_report

TITLE = "SmolLM2-135M: width vs depth, KD vs CE vs random init, head merging"
FINDING = ("Width pruning retrains better than depth at equal size (Tables 1, 11); pruning + "
           "distillation beats pruning + conventional training, which beats random init (Table "
           "12); head merging is the paper's default when heads are pruned (§2.3).")

_CONFIG_FILE = pathlib.Path(__file__).resolve().parents[2] / "configs" / "smollm2_135m.py"
_spec = importlib.util.spec_from_file_location("smollm2_135m", _CONFIG_FILE)
smollm2 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(smollm2)

CROSS_ENTROPY = {"config.distill.loss.logit_loss": "none", "config.distill.loss.logit_weight": 0.0,
                 "config.distill.loss.ce_weight": 1.0}
STUDY_STAGES = ("importance", "prune", "distill", "evaluate")
# Head merging only acts when heads are pruned: 9 -> 6 heads and MLP 1024 (69% of the
# non-embedding parameters).
HEADS = dict(num_layers=30, hidden_size=576, num_attention_heads=6, num_key_value_heads=3,
             intermediate_size=1024)
DROP_LOSS = {"config.prune.depth_criterion": "drop_loss", "config.importance.drop_loss": True,
             "config.importance.drop_loss_batches": 2}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  config = smollm2.get_config(arg)
  config.stages = STUDY_STAGES
  return config


def get_hyper(h, config):
  default_stages = ("check",) + STUDY_STAGES + ("report",)
  target = lambda name: {"config.prune.target": smollm2.TARGETS[name]}
  width = target(smollm2.DEFAULT_TARGET)
  return h.chain([
      h.named("width_kd", {**width, "config.stages": default_stages}),
      h.named("depth_kd", {**target("depth"), **DROP_LOSS}),
      h.named("width_ce", {**width, **CROSS_ENTROPY}),
      h.named("width_random_ce", {**width, **CROSS_ENTROPY, "config.prune.reinitialize": True}),
      h.named("heads_kd", {"config.prune.target": HEADS}),
      h.named("heads_merging_kd", {"config.prune.target": HEADS,
                                   "config.prune.head_merging": True}),
  ])


def _tokens(point) -> int:
  section = point.config.distill
  return point.distill["steps"] * section.batch_size * section.seq_len


def summarize(results: sweep_report.SweepResults, out: pathlib.Path) -> sweep_report.Section:
  points = results.points
  first = points["width_kd"]
  teacher_loss = first.prune["source_validation_loss"]
  teacher_accuracy = first.evaluation.get("teacher", {}).get("next_line/acc", math.nan)
  after = {name: p.distill["val_ce"] for name, p in points.items()}
  accuracy = {name: p.evaluation.get("distilled", {}).get("next_line/acc", math.nan)
              for name, p in points.items()}
  rows = []
  for name, point in points.items():
    prune = point.prune
    rows.append((name, f"{prune['pruned_params']:,}", f"{prune['pruned_validation_loss']:.3f}",
                 f"{after[name]:.3f}", f"{accuracy[name]:.3f}",
                 f"{point.distill.get('seconds', math.nan) / 60:.1f}"))
  examples = first.config.evaluate.tasks.next_line.num_examples
  table = sweep_report.markdown_table(
      ("run", "params", "val loss, zero-shot", f"val loss after {first.distill['steps']} steps",
       "next-line acc", "retraining min"), rows)
  table += (f"\n\nTeacher: {teacher_loss:.3f} nats/token, next-line accuracy "
            f"{teacher_accuracy:.3f} ({examples} examples, 4 choices: a standard error of about "
            f"{math.sqrt(0.25 / examples):.2f}). Every run retrained on the same "
            f"{_tokens(first):,} tokens.")

  width_beats_depth = after["width_kd"] < after["depth_kd"]
  merging_helps = after["heads_merging_kd"] < after["heads_kd"]
  order = ("width_kd", "width_ce", "width_random_ce")
  kd_order = all(after[a] < after[b] for a, b in zip(order, order[1:]))
  verdict = (f"width {after['width_kd']:.3f} vs depth {after['depth_kd']:.3f} after retraining: "
             f"{'width ahead' if width_beats_depth else 'width not ahead'}. KD "
             f"{after['width_kd']:.3f}, CE {after['width_ce']:.3f}, random init "
             f"{after['width_random_ce']:.3f}: "
             f"{'the paper order' if kd_order else 'not the paper order'}. Head merging "
             f"{after['heads_merging_kd']:.3f} vs off {after['heads_kd']:.3f}: "
             f"{'merging helps' if merging_helps else 'merging does not help'}.")
  held = [width_beats_depth, kd_order]
  agreement = "agrees" if all(held) else "in part" if any(held) else "disagrees"

  curves = {}
  for name, point in points.items():
    steps, values = point.curve()
    per_step = point.config.distill.batch_size * point.config.distill.seq_len
    curves[name] = ([s * per_step for s in steps], values)
  worst = max(p.prune["pruned_validation_loss"] for n, p in points.items() if "random" not in n)
  plots = (sweep_report.plot_lines(
      out / "smollm2_curves.png", curves, title="SmolLM2-135M pruned to about half: recovery",
      xlabel="retraining tokens (0 = pruned, zero-shot)", ylabel="validation loss (nats/token)",
      hlines={"teacher": teacher_loss}, ylim=(teacher_loss - 0.2, worst + 0.3)),)
  return sweep_report.Section(table, verdict, plots, agreement)
