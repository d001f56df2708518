"""minitron-jax: structured pruning and knowledge distillation of decoder LLMs in JAX/Flax.

The library is grouped by concern; each subpackage's __init__ names its modules:
  families     one small file per model family: HF names, traits, hooks, tiny test model
  core         atomic writes, multi-process helpers, preemption, plots
  models       config and presets, the decoder, attention, experts, partitioning, generation
  checkpoints  Hugging Face, GGUF and orbax checkpoints; building a model from settings
  inputs       the data pipeline, its sources and the tokenizers
  objectives   cross-entropy, distillation losses, the chunked head loss and its KLDs
  compress     importance, pruning, architecture search
  training     distillation step and loop, pretraining, the stored teacher
  evaluation   multiple-choice and perplexity scoring, lm-evaluation-harness
  run          the main job: settings, stages, validation, pipeline, report
  tools        sweeps, memory plans, scaling checks, benchmark helpers
errors.py (ConfigError) sits below them all; main.py and lm_eval.py are the command lines.

`from minitron_jax import hf, model, importance, prune, distill` (any module by its own name)
keeps working: the name resolves to its module in its subpackage.
"""

import importlib

__version__ = "0.1.0"

# module name -> its subpackage, for `from minitron_jax import <module>`.
_SUBPACKAGE = {
    'atomic': 'core',
    'attention': 'models',
    'benchmark': 'tools',
    'build': 'checkpoints',
    'checkpoint': 'checkpoints',
    'chunked_ce': 'objectives',
    'chunked_head_loss': 'objectives',
    'columnar_source': 'inputs',
    'config': 'models',
    'corpus': 'inputs',
    'curves': 'core',
    'data': 'inputs',
    'distill': 'training',
    'distributed': 'core',
    'evaluate': 'evaluation',
    'flops': 'models',
    'fused_kld': 'objectives',
    'generate': 'models',
    'gguf_checkpoint': 'checkpoints',
    'gguf_tokenizer': 'inputs',
    'head_loss_layout': 'objectives',
    'hf': 'checkpoints',
    'hf_config': 'checkpoints',
    'importance': 'compress',
    'kv_cache': 'models',
    'lm_eval_backend': 'evaluation',
    'lm_eval_tasks': 'evaluation',
    'losses': 'objectives',
    'mc_tasks': 'evaluation',
    'memory_plan': 'tools',
    'model': 'models',
    'moe': 'models',
    'moe_parallel': 'models',
    'partitioning': 'models',
    'pipeline': 'run',
    'plots': 'core',
    'preemption': 'core',
    'pretrain': 'training',
    'prune': 'compress',
    'registry': 'run',
    'retrain': 'run',
    'run_config': 'run',
    'scaling': 'tools',
    'search': 'compress',
    'search_score': 'run',
    'search_space': 'compress',
    'sharding': 'models',
    'source_spec': 'inputs',
    'sparse_kld': 'objectives',
    'stage_context': 'run',
    'stage_settings': 'run',
    'stdlib_dataset': 'inputs',
    'stdlib_tasks': 'evaluation',
    'teacher_logits_inputs': 'run',
    'sweep': 'tools',
    'sweep_report': 'tools',
    'task_config': 'run',
    'teacher_logits_store': 'training',
    'text_source': 'inputs',
    'tokamax_kernels': 'models',
    'tokenizer': 'inputs',
    'validate': 'run',
    'workdir_lock': 'core',
}


def __getattr__(name: str):
  if name in _SUBPACKAGE:
    return importlib.import_module(f"minitron_jax.{_SUBPACKAGE[name]}.{name}")
  raise AttributeError(f"module 'minitron_jax' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(_SUBPACKAGE))
