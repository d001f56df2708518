"""The decoder: its config and presets, layers, attention kernels, mixtures of experts, the
logical-axis partitioning and mesh placement, KV-cache generation and FLOP counts.

Modules: attention, config, flops, generate, kv_cache, model, moe, moe_parallel, partitioning,
sharding, tokamax_kernels.
"""

__all__ = [
    'attention',
    'config',
    'flops',
    'generate',
    'kv_cache',
    'model',
    'moe',
    'moe_parallel',
    'partitioning',
    'sharding',
    'tokamax_kernels',
]
