"""The decoder: its config and presets, its blocks each beside their kernels (attention, moe;
layers: params, norms, the MLP; rope), the logical-axis partitioning and mesh placement, KV-cache
generation and FLOP counts.

Modules: attention, config, flops, generate, kv_cache, layers, model, moe, moe_parallel,
partitioning, rope, sharding, tokamax_kernels.
"""

from minitron_jax.core import exports

ENTRY_POINTS = {
    "config": ("ModelConfig", "PRESETS", "preset"),
    "model": ("init", "apply", "hidden_states", "abstract_params"),
    "generate": ("generate_text",),
    "partitioning": ("MeshConfig", "make_mesh", "batch_sharding", "logical_to_spec"),
    "sharding": ("param_shardings", "shard_params"),
    "flops": ("distillation_flops_per_token",),
}
__getattr__, __dir__, __all__ = exports.lazy(__name__, ENTRY_POINTS)
