r"""Paper Tables 16-18: which distillation loss retrains a width-pruned student best.

The shipped stdlib teacher is pruned in width only, so depth is kept (hidden 128 -> 96, 8 -> 4
query heads, MLP 512 -> 256; 443,232 of 1,049,728 parameters), then distilled for the same steps
with:
  forward_kl, reverse_kl, mse, cosine     logit loss only (Table 17/18)
  forward_kl+ce                           plus next-token cross-entropy
  forward_kl+is_last                      plus L_is: cosine on the last hidden state, through the
                                          learned projection, dynamic alpha (Table 16)
  forward_kl+is_all+emb                   plus L_is on every layer's input and the embeddings
  forward_kl,data_seed=1                  forward_kl again with another data order: the spread
                                          between two runs of one setting
Every run reports the same validation loss (next-token cross-entropy), whatever it trained on.

  python experiments/sweep.py --sweep=experiments/sweeps/loss_functions.py
  python experiments/sweep.py --sweep=experiments/sweeps/loss_functions.py:runlocal
"""

import pathlib

import ml_collections

from minitron_jax import run_config, sweep_report

TITLE = "Distillation loss functions and components (Tables 16-18)"
FINDING = ("Forward KL on logits beats reverse KL, MSE and cosine; with depth kept, the logit loss "
           "alone beats adding intermediate-state losses (L_is).")

WIDTH_TARGET = dict(num_layers=4, hidden_size=96, num_attention_heads=4, num_key_value_heads=4,
                    intermediate_size=256)
LOGIT_LOSSES = ("forward_kl", "reverse_kl", "mse", "cosine")
LOSS = "config.distill.loss."
SPREAD_POINT = "forward_kl,data_seed=1"


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  options = run_config.parse_arg(arg)
  config = run_config.base_config()
  config.stages = ("importance", "prune", "distill")
  config.prune.target = ml_collections.ConfigDict(WIDTH_TARGET)
  config.importance.update(drop_loss=False, block_sizes=(1,))
  config.distill.update(steps=300, eval_every=50, checkpoint_every=150)
  if "runlocal" in options:
    run_config.runlocal(config)
  return config


def get_hyper(h, config):
  del config  # the same points at every size
  hidden = {LOSS + "hidden_loss": "cosine", LOSS + "dynamic_alpha": True}
  return h.chain([
      *(h.named(loss, {LOSS + "logit_loss": loss}) for loss in LOGIT_LOSSES),
      h.named("forward_kl+ce", {LOSS + "ce_weight": 1.0}),
      h.named("forward_kl+is_last", {**hidden, LOSS + "hidden_pairs": ((-1, -1),)}),
      h.named("forward_kl+is_all+emb", {**hidden, LOSS + "embedding_term": True,
                                        LOSS + "hidden_pairs": ((1, 1), (2, 2), (3, 3),
                                                                (-1, -1))}),
      h.named(SPREAD_POINT, {"config.data.seed": 1}),
  ])


def summarize(results: sweep_report.SweepResults, out: pathlib.Path) -> sweep_report.Section:
  rows, curves, after = [], {}, {}
  for name, point in results.points.items():
    after[name] = point.distill["val_ce"]
    rows.append((name, after[name], after[name] - after["forward_kl"]))
    curves[name] = point.curve()
  first = next(iter(results.points.values()))
  steps, teacher = first.distill["steps"], first.prune["source_validation_loss"]
  table = sweep_report.markdown_table(
      ("training loss", f"val loss after {steps} steps", "vs forward_kl"), rows)
  table += (f"\n\nTeacher: {teacher:.4f}; pruned, zero-shot: "
            f"{first.prune['pruned_validation_loss']:.4f}.")

  spread = abs(after[SPREAD_POINT] - after["forward_kl"]) if SPREAD_POINT in after else 0.0
  reference = after["forward_kl"]
  logit = {n: after[n] for n in LOGIT_LOSSES if n in after and n != "forward_kl"}
  logit_beaten = [n for n, v in logit.items() if v - reference > spread]
  with_is = {n: v for n, v in after.items() if "+is" in n}
  is_helps = [n for n, v in with_is.items() if reference - v > spread]
  verdict = (f"two forward_kl runs with different data order differ by {spread:.4f}; "
             f"forward_kl beats {len(logit_beaten)}/{len(logit)} other logit losses by more than "
             "that; adding L_is changes the loss by "
             + ", ".join(f"{v - reference:+.4f} ({n})" for n, v in with_is.items()) + ". ")
  if len(logit_beaten) == len(logit) and not is_helps:
    verdict += ("Agrees with the paper" + (" (L_is does not help; whether it hurts is within the "
                                           "spread)." if any(v - reference <= spread
                                                             for v in with_is.values())
                                          else ")."))
  else:
    parts = []
    if len(logit_beaten) < len(logit):
      parts.append("forward_kl does not clearly beat " + ", ".join(
          n for n in logit if n not in logit_beaten))
    if is_helps:
      parts.append(f"{', '.join(is_helps)} beat logit-only by more than the spread")
    verdict += "Disagrees with the paper in part: " + "; ".join(parts) + "."

  plots = (sweep_report.plot_lines(
      out / "loss_functions_curves.png", curves, title="Distillation loss functions",
      xlabel="distillation step (0 = pruned)", ylabel="validation loss (nats/byte)",
      hlines={"teacher": teacher},
      ylim=(teacher - 0.05, first.prune["pruned_validation_loss"] + 0.1)),)
  return sweep_report.Section(table, verdict, plots)
