r"""The embedded default: the shipped stdlib teacher, scored, pruned to about half, distilled and
evaluated, with a report.

Run:
  python -m minitron_jax.main --config=configs/default.py --workdir=/tmp/minitron-default

Variants:
  --config=configs/default.py:runlocal           every stage on tiny sizes (a smoke test)
  --config=configs/default.py:family=nemotron   a random tiny model of any supported family
  --config.model.hf_path=DIR                     any Hugging Face model directory (its
                                                 tokenizer.json is used when tokenizer='')
  --config.prune.target.num_layers=2             any target size (absolute)
  --config.distill.loss.logit_loss=reverse_kl    any loss setting (see minitron_jax/objectives/losses.py)
"""

import ml_collections

from minitron_jax.run import run_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  options = run_config.parse_arg(arg)
  config = run_config.base_config(options)
  if "runlocal" in options:
    run_config.runlocal(config)
  return config
