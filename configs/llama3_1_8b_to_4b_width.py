r"""Llama-3.1-8B -> Llama-3.1-Minitron 4B-Width (follow-up paper 2408.11796): teacher correction,
then width pruning (hidden 4096 -> 3072, MLP 14336 -> 9216; heads and layers kept), distillation.

Run:
  python -m minitron_jax.main --config=configs/llama3_1_8b_to_4b_width.py --workdir=/runs/w \
    --config.model.hf_path=/ckpt/Llama-3.1-8B --config.data.tfds_name=NAME
Smoke test:
  python -m minitron_jax.main --config=configs/llama3_1_8b_to_4b_width.py:runlocal --workdir=/tmp/s
"""

import ml_collections

from minitron_jax import run_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  options = run_config.parse_arg(arg)
  config = run_config.base_config()
  run_config.use_real_model(config, "llama3_1_8b")
  config.stages = ("teacher_correction", "importance", "prune", "distill", "evaluate", "report")
  config.teacher_correction.steps = 27_000  # ~127B tokens at 1152 x 4096 per step
  config.teacher_correction.optimizer.update(peak_lr=1e-5, end_lr=1e-6)  # a gentle fine-tune
  config.prune.target = ml_collections.ConfigDict(run_config.LLAMA_4B_WIDTH)
  config.distill.update(steps=run_config.FULL_STEPS, batch_size=run_config.GLOBAL_BATCH)
  config.distill.optimizer.accumulation_steps = 16
  if "runlocal" in options:
    run_config.runlocal(config)
  return config
