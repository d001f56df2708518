"""The decoder: its config and presets, its blocks each beside their kernels (attention, moe;
layers: params, norms, the MLP; rope), the logical-axis partitioning and mesh placement, KV-cache
generation and FLOP counts.

Modules: attention, config, flops, generate, kv_cache, layers, model, moe, moe_parallel,
partitioning, rope, sharding, tokamax_kernels.
"""

__all__ = [
    'attention',
    'config',
    'flops',
    'generate',
    'kv_cache',
    'layers',
    'model',
    'moe',
    'moe_parallel',
    'partitioning',
    'rope',
    'sharding',
    'tokamax_kernels',
]
