r"""Distillation vs conventional (cross-entropy only) retraining of the same pruned student.

Both runs start from the embedded default's pruned student (the shipped stdlib teacher pruned to
about half its parameters) and train for the same steps on the same batches.

  python experiments/kd_vs_ce.py --workdir=/tmp/kd_vs_ce --steps=300 --peak_lr=2e-3
"""

import json
import pathlib
import sys

from absl import app, flags

from minitron_jax.run import pipeline

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "configs"))
import default  # noqa: E402  (configs/ is not a package)

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/kd_vs_ce", "Output directory.")
_STEPS = flags.DEFINE_integer("steps", 300, "Retraining steps for each run.")
_PEAK_LR = flags.DEFINE_float("peak_lr", 2e-3, "Peak learning rate of both runs.")


def main(argv):
  del argv
  rows = []
  for name, loss in (("KD (forward KL)", {}),
                     ("CE only", dict(logit_loss="none", logit_weight=0.0, ce_weight=1.0))):
    config = default.get_config()
    config.distill.steps = _STEPS.value
    config.distill.eval_every = _STEPS.value
    config.distill.optimizer.peak_lr = _PEAK_LR.value
    config.distill.loss.update(loss)
    workdir = pathlib.Path(_WORKDIR.value) / name.split()[0].lower()
    pipeline.run(config, workdir)
    prune_summary = json.loads((workdir / "prune" / "summary.json").read_text())
    distill_summary = json.loads((workdir / "distill" / "summary.json").read_text())
    rows.append((name, prune_summary, distill_summary))
  print(f"\n| run | teacher val loss | pruned zero-shot | after {_STEPS.value} steps | "
        "params |\n|---|---|---|---|---|")
  for name, pruned, distilled in rows:
    print(f"| {name} | {pruned['source_validation_loss']:.4f} | "
          f"{pruned['pruned_validation_loss']:.4f} | {distilled['val_ce']:.4f} | "
          f"{pruned['pruned_params']:,} / {pruned['source_params']:,} |")


if __name__ == "__main__":
  app.run(main)
