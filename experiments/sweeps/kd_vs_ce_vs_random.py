r"""Paper Table 12: pruning + distillation vs pruning + conventional training vs random init.

The embedded default's student (the shipped stdlib teacher pruned to 3 layers and MLP 256;
508,800 of 1,049,728 parameters) is retrained three ways:
  pruned_kd            pruned weights, logit KD from the teacher, STEPS steps
  pruned_ce            pruned weights, next-token cross-entropy, STEPS steps (equal tokens)
  pruned_ce_flops      the same with as many steps as KD's FLOPs buy (a KD step also runs the
                       teacher forward: ~1.67x the FLOPs of a CE step for this pair)
  pruned_ce_flops,lr=5e-4  the same at a quarter of the peak learning rate (the shared 2e-3 suits
                       KD; CE may prefer a gentler one)
  random_ce_flops      the same architecture from random weights, cross-entropy, equal FLOPs
All share the learning-rate schedule shape and the data order.

  python experiments/sweep.py --sweep=experiments/sweeps/kd_vs_ce_vs_random.py
  python experiments/sweep.py --sweep=experiments/sweeps/kd_vs_ce_vs_random.py:runlocal
"""

import pathlib

import ml_collections

from minitron_jax.checkpoints import build
from minitron_jax.models import flops
from minitron_jax.run import run_config
from minitron_jax.tools import sweep_report
from minitron_jax.models import config as config_lib

TITLE = "Distillation vs conventional training vs random init (Table 12)"
FINDING = ("At equal compute, pruned + distilled beats pruned + conventionally trained (LM loss), "
           "which beats the same architecture trained from random init.")

STEPS = 400
CROSS_ENTROPY = {"config.distill.loss.logit_loss": "none", "config.distill.loss.logit_weight": 0.0,
                 "config.distill.loss.ce_weight": 1.0}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  return run_config.sweep_config(arg, ("importance", "prune", "distill"), steps=STEPS,
                                 eval_every=50, checkpoint_every=200)


def equal_flops_steps(config: ml_collections.ConfigDict) -> int:
  """CE steps with the FLOPs of config.distill.steps KD steps (teacher forward + student
  forward/backward vs student forward/backward only)."""
  teacher = build.model_config(config.model)
  student = teacher.replace(**config.prune.target.to_dict())
  seq = config.distill.seq_len
  ratio = (flops.distillation_flops_per_token(student, teacher, seq)
           / flops.distillation_flops_per_token(student, None, seq))
  return round(config.distill.steps * ratio)


def get_hyper(h, config):
  flops_steps = {"config.distill.steps": equal_flops_steps(config)}
  return h.chain([
      h.named("pruned_kd"),
      h.named("pruned_ce", CROSS_ENTROPY),
      h.named("pruned_ce_flops", {**CROSS_ENTROPY, **flops_steps}),
      h.named("pruned_ce_flops,lr=5e-4", {**CROSS_ENTROPY, **flops_steps,
                                          "config.distill.optimizer.peak_lr": 5e-4}),
      h.named("random_ce_flops", {**CROSS_ENTROPY, **flops_steps,
                                  "config.prune.reinitialize": True}),
  ])


def summarize(results: sweep_report.SweepResults, out: pathlib.Path) -> sweep_report.Section:
  rows, curves, after = [], {}, {}
  kd_flops = None
  for name, point in results.points.items():
    distill, prune = point.distill, point.prune
    teacher, student = (config_lib.ModelConfig.from_dict(prune[k]) for k in ("source", "pruned"))
    uses_teacher = point.config.distill.loss.logit_weight > 0
    per_token = flops.distillation_flops_per_token(student, teacher if uses_teacher else None,
                                                   point.config.distill.seq_len)
    after[name] = distill["val_ce"]
    total = per_token * distill["steps"]
    if name == "pruned_kd":
      kd_flops = total
    rows.append((name, distill["steps"], total, prune["pruned_validation_loss"], after[name]))
    curves[name] = (point.curve(), per_token)
  kd_per_token = kd_flops / results["pruned_kd"].distill["steps"]
  rows = [(n, s, f"{f / kd_flops:.2f}×", z, a) for n, s, f, z, a in rows]
  # x in KD-step equivalents of compute, so equal-compute runs end at the same x.
  curves = {n: ([step * per_token / kd_per_token for step in steps], values)
            for n, ((steps, values), per_token) in curves.items()}
  first = next(iter(results.points.values()))
  teacher_loss = first.prune["source_validation_loss"]
  table = sweep_report.markdown_table(
      ("run", "steps", "compute (× KD run)", "val loss at start", "val loss after"), rows)
  table += f"\n\nTeacher: {teacher_loss:.4f}."

  ce_runs = [n for n in after if n.startswith("pruned_ce_flops")]
  best_ce = min(ce_runs, key=after.get)
  order = ("pruned_kd", best_ce, "random_ce_flops")
  holds = all(after[a] < after[b] for a, b in zip(order, order[1:]))
  verdict = ("at equal compute (best CE run shown): " + " < ".join(
      f"{n} {after[n]:.4f}" for n in sorted(order, key=after.get)) + ". ")
  verdict += ("Agrees with the paper." if holds else "Disagrees with the paper's order.")

  plots = (sweep_report.plot_lines(
      out / "kd_vs_ce_vs_random_curves.png", curves,
      title="Retraining the pruned student: KD vs CE vs random init",
      xlabel="compute, in distillation steps' worth of FLOPs", ylabel="validation loss (nats/byte)",
      hlines={"teacher": teacher_loss}, ylim=(teacher_loss - 0.05, 3.0), markers=False),)
  return sweep_report.Section(table, verdict, plots, "agrees" if holds else "disagrees")
