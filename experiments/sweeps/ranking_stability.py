r"""Paper Figure 10: how the ranking of search candidates moves during lightweight retraining.

The architecture search prunes the shipped stdlib teacher to every candidate within 4% of 520k
parameters (layers {2,3,4} x hidden {96,112,128} x heads {4,8} x MLP ratio {1.5..4}: six
candidates from 2 to 4 layers), distils each from the teacher for the same steps and ranks them by
validation loss at every evaluation step.

  python experiments/sweep.py --sweep=experiments/sweeps/ranking_stability.py
  python experiments/sweep.py --sweep=experiments/sweeps/ranking_stability.py:runlocal
"""

import pathlib

import ml_collections

from minitron_jax.run import run_config
from minitron_jax.tools import sweep_report

TITLE = "Candidate-ranking stability during retraining (Figure 10)"
FINDING = ("The ranking of pruned candidates changes during the first retraining steps, then "
           "settles, so a short retraining (~300 steps there) is enough to pick the best.")

SETTLED = 0.9  # Spearman rho with the final ranking from which a ranking counts as settled


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  config = run_config.sweep_config(arg, ("importance", "search"), log_every=25, eval_every=300)
  config.search.space.update(num_layers=(2, 3, 4), hidden_size=(96, 112, 128),
                             num_attention_heads=(4, 8), mlp_expansion=(1.5, 2.0, 2.5, 3.0, 4.0),
                             budget=520_000, tolerance=0.04)
  if "runlocal" not in run_config.parse_arg(arg):  # runlocal: two candidates, four steps
    config.search.update(retrain_steps=300, eval_steps=(25, 50, 100, 150, 200, 300))
  return config


def get_hyper(h, config):
  del config  # one search
  return h.named("search")


def summarize(results: sweep_report.SweepResults, out: pathlib.Path) -> sweep_report.Section:
  result = results["search"].search
  steps = result.eval_steps
  table = result.to_markdown().strip()

  spearman = result.spearman
  settled_from = next(s for s in steps if all(spearman[t] >= SETTLED for t in steps if t >= s))
  changed = [s for s in steps[:-1] if result.rankings[s] != result.rankings[result.final_step]]
  early_best = result.rankings[steps[0]][0]
  verdict = (f"the ranking at step {steps[0]} has Spearman ρ = {spearman[steps[0]]:+.2f} with the "
             f"final one (best then: {early_best}; finally: {result.best.name}); it stays at "
             f"ρ ≥ {SETTLED} from step {settled_from} on. ")
  if changed and settled_from < result.final_step:
    verdict += "Agrees with the paper: early rankings change, then settle."
  elif not changed:
    verdict += "Disagrees with the paper: the ranking never changes here."
  else:
    verdict += "Disagrees with the paper: the ranking has not settled by the last step."

  ranks = {n: (list(steps), [result.ranks[n][s] for s in steps]) for n in result.losses}
  losses = {n: (list(steps), [result.losses[n][s] for s in steps]) for n in result.losses}
  plots = (
      sweep_report.plot_lines(out / "ranking_stability_ranks.png", ranks,
                              title="Candidate rank during retraining (1 = best)",
                              xlabel="retraining step", ylabel="rank", invert_y=True,
                              legend_outside=True),
      sweep_report.plot_lines(out / "ranking_stability_losses.png", losses,
                              title="Candidate validation loss during retraining",
                              xlabel="retraining step", ylabel="validation loss (nats/byte)",
                              legend_outside=True),
  )
  agreement = "agrees" if changed and settled_from < result.final_step else "disagrees"
  return sweep_report.Section(table, verdict, plots, agreement)
