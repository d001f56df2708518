r"""Qwen3-30B-A3B (30.5B parameters, 3.35B active per token; the model card rounds to 30.5B / 3.3B)
pruned as NVIDIA Model Optimizer's Minitron prunes a mixture of experts: importance, a search over
experts, expert width, hidden size and depth, prune, distil, evaluate, report.

Search space (attention heads and query groups kept): num_experts {96, 112, 128} (8 routed per
token throughout), moe_intermediate_size {512, 640, 768}, hidden_size {1536, 1792, 2048},
num_layers {40, 44, 48}. Constraints, each ± 10%: 2.6B active parameters per token and 36 GB of
serving memory (bf16 weights plus the KV cache of one 4096-token sequence, i.e. ~17.5B
parameters): 17 candidates of 16.0B-19.3B / 2.34B-2.85B active. A ~22B total at ~2.4B active
would leave no room to prune experts (active parameters do not depend on the expert count, so
only 128-expert shapes reach 22B there); this point keeps 96, 112 and 128 in play.
Without the search, `prune.target` is its candidate L48-D1792-E96-M640: 17.2B, 2.67B active.

Distillation adds the student router's load-balancing loss at Qwen3-MoE's own coefficient
(router_aux_loss_coef 0.001 in its config.json), since pruning experts unbalances the routing;
`--config.distill.loss.router_aux_loss_coef=0` turns it off.

Run (the checkpoint and a prepared TFDS dataset on disk):
  python -m minitron_jax.main --config=configs/qwen3_30b_a3b_prune.py \
    --workdir=/runs/qwen3_30b_a3b_prune --config.model.hf_path=/ckpt/Qwen3-30B-A3B \
    --config.data.tfds_name=NAME
Smoke test (tiny random Qwen3-MoE with 6 experts, every stage, on a CPU):
  python -m minitron_jax.main --config=configs/qwen3_30b_a3b_prune.py:runlocal --workdir=/tmp/s
"""

import ml_collections

from minitron_jax.run import run_config

# The search's fallback and the shape without a search: a quarter of the experts, 5/6 of their
# width and of the hidden size; every layer and head kept.
QWEN3_MOE_17B = dict(num_layers=48, hidden_size=1792, num_attention_heads=32,
                     num_key_value_heads=4, num_experts=96, moe_intermediate_size=640)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  options = run_config.parse_arg(arg)
  config = run_config.base_config()
  run_config.use_real_model(config, "qwen3_30b_a3b")
  config.stages = ("importance", "search", "prune", "distill", "evaluate", "report")
  config.prune.target = ml_collections.ConfigDict(QWEN3_MOE_17B)
  config.search.space.update(
      num_layers=(40, 44, 48), hidden_size=(1536, 1792, 2048), num_attention_heads=(),
      mlp_expansion=(), num_experts=(96, 112, 128), moe_intermediate_size=(512, 640, 768),
      budget=0, active_params=2_600_000_000, memory=36_000_000_000, memory_batch=1,
      memory_seq_len=4096, memory_dtype="bfloat16", tolerance=0.1, round_to=128)
  config.search.retrain_steps = run_config.LIGHT_STEPS
  config.search.eval_steps = (100, 200, 300, 400)
  config.distill.loss.router_aux_loss_coef = 0.001
  config.distill.update(steps=run_config.FULL_STEPS, batch_size=run_config.GLOBAL_BATCH)
  config.distill.optimizer.accumulation_steps = 16
  if "runlocal" in options:
    run_config.runlocal(config)
  return config
