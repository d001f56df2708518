r"""Nemotron-4 15B -> Minitron 8B: importance, the paper's architecture search (Table 13 space,
8B +- 5%, each candidate retrained ~400 steps), prune, distil, evaluate.

With exact parameter counts the Table 13 grid has 18 candidates in 7.6B-8.4B, not the paper's
15: the paper's list (Table 20) is the grid's 7.77B-8.55B window;
`search.table20_window_space_15b_to_8b` reproduces it exactly.

Run (the checkpoint and a prepared TFDS dataset on disk):
  python -m minitron_jax.main --config=configs/nemotron4_15b_to_8b.py --workdir=/runs/15b_to_8b \
    --config.model.hf_path=/ckpt/nemotron-4-15b --config.data.tfds_name=NAME
Smoke test (tiny random Nemotron, every stage, seconds on a CPU):
  python -m minitron_jax.main --config=configs/nemotron4_15b_to_8b.py:runlocal --workdir=/tmp/s
"""

import dataclasses

import ml_collections

from minitron_jax.compress import search
from minitron_jax.run import run_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  options = run_config.parse_arg(arg)
  config = run_config.base_config()
  run_config.use_real_model(config, "nemotron4_15b")
  config.stages = ("importance", "search", "prune", "distill", "evaluate", "report")
  config.prune.target = ml_collections.ConfigDict(run_config.MINITRON_8B)
  config.search.space = ml_collections.ConfigDict(
      dataclasses.asdict(search.paper_space_15b_to_8b()))
  config.search.retrain_steps = run_config.LIGHT_STEPS
  config.search.eval_steps = (100, 200, 300, 400)
  config.distill.update(steps=run_config.FULL_STEPS, batch_size=run_config.GLOBAL_BATCH)
  config.distill.optimizer.accumulation_steps = 16
  if "runlocal" in options:
    run_config.runlocal(config)
  return config
