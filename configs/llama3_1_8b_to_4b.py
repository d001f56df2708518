r"""Llama-3.1-8B -> Llama-3.1-Minitron 4B (follow-up paper 2408.11796): teacher correction, then
  variant=width (default): hidden 4096 -> 3072 and MLP 14336 -> 9216, heads and layers kept;
  variant=depth: removal of the contiguous 16-layer block whose removal raises LM loss least;
then distillation from the corrected teacher.

Run:
  python -m minitron_jax.main --config=configs/llama3_1_8b_to_4b.py:variant=depth \
    --workdir=/runs/llama_4b_depth --config.model.hf_path=/ckpt/Llama-3.1-8B \
    --config.data.tfds_name=NAME
Smoke test (tiny random Llama, every stage, about a minute on a CPU):
  python -m minitron_jax.main --config=configs/llama3_1_8b_to_4b.py:variant=depth,runlocal \
    --workdir=/tmp/s
"""

import ml_collections

from minitron_jax.run import run_config
from minitron_jax.errors import ConfigError

VARIANTS = ("width", "depth")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  options = run_config.parse_arg(arg)
  variant = options.get("variant", "width")
  if variant not in VARIANTS:
    raise ConfigError(f"variant={variant!r} is not supported; allowed: {VARIANTS}")
  config = run_config.base_config()
  run_config.use_real_model(config, "llama3_1_8b")
  config.stages = ("teacher_correction", "importance", "prune", "distill", "evaluate", "report")
  config.teacher_correction.steps = 27_000  # ~127B tokens at 1152 x 4096 per step
  config.teacher_correction.optimizer.update(peak_lr=1e-5, end_lr=1e-6)  # a gentle fine-tune
  if variant == "width":
    config.prune.target = ml_collections.ConfigDict(run_config.LLAMA_4B_WIDTH)
  else:
    config.prune.target = ml_collections.ConfigDict(run_config.LLAMA_4B_DEPTH)
    config.prune.update(contiguous_depth=True, depth_criterion="drop_loss")
    config.importance.update(drop_loss=True, drop_block_sizes=(16,), drop_loss_batches=16)
  config.distill.update(steps=run_config.FULL_STEPS, batch_size=run_config.GLOBAL_BATCH)
  config.distill.optimizer.accumulation_steps = 16
  if "runlocal" in options:
    run_config.runlocal(config)
  return config
