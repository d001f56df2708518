r"""Nemotron-4 15B -> Minitron 8B -> Minitron 4B, iteratively (paper Best Practice #8, Table 12):
the 8B student is pruned again to 4B and distilled with the original 15B as teacher.

Run (the checkpoint and a prepared TFDS dataset on disk):
  python -m minitron_jax.main --config=configs/nemotron4_15b_to_4b.py --workdir=/runs/15b_to_4b \
    --config.model.hf_path=/ckpt/nemotron-4-15b --config.data.tfds_name=NAME
Smoke test:
  python -m minitron_jax.main --config=configs/nemotron4_15b_to_4b.py:runlocal --workdir=/tmp/s
"""

import ml_collections

from minitron_jax.run import run_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  options = run_config.parse_arg(arg)
  config = run_config.base_config()
  run_config.use_real_model(config, "nemotron4_15b")
  config.stages = ("importance", "prune", "distill", "evaluate", "report")
  config.compression = (
      dict(name="8b", target=run_config.MINITRON_8B, teacher="original",
           distill_steps=run_config.FULL_STEPS),
      dict(name="4b", target=run_config.MINITRON_4B, teacher="original",
           distill_steps=run_config.FULL_STEPS),
  )
  config.distill.update(steps=run_config.FULL_STEPS, batch_size=run_config.GLOBAL_BATCH)
  config.distill.optimizer.accumulation_steps = 16
  if "runlocal" in options:
    run_config.runlocal(config)
  return config
