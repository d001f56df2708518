r"""Llama-3.1-8B -> Llama-3.1-Minitron 4B-Depth (follow-up paper 2408.11796): teacher correction,
then removal of one contiguous block of 16 layers (the one whose removal raises LM loss least),
distillation.

Run:
  python -m minitron_jax.main --config=configs/llama3_1_8b_to_4b_depth.py --workdir=/runs/d \
    --config.model.hf_path=/ckpt/Llama-3.1-8B --config.data.tfds_name=NAME
Smoke test:
  python -m minitron_jax.main --config=configs/llama3_1_8b_to_4b_depth.py:runlocal --workdir=/tmp/s
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
  config.prune.target = ml_collections.ConfigDict(run_config.LLAMA_4B_DEPTH)
  config.prune.update(contiguous_depth=True, depth_criterion="drop_loss")
  config.importance.update(drop_loss=True, drop_block_sizes=(16,), drop_loss_batches=16)
  config.distill.update(steps=run_config.FULL_STEPS, batch_size=run_config.GLOBAL_BATCH)
  config.distill.optimizer.accumulation_steps = 16
  if "runlocal" in options:
    run_config.runlocal(config)
  return config
