"""Model families, one small file each: a family's Hugging Face names, the architecture traits its
models share, what its `config.json` leaves out, its hooks for what only it has, and its tiny test
model. Adding a family is a new file here, one line below, and its tests.

Modules: family (what a family is), windows and experts (pieces several families share), and one
per family: llama, mistral, qwen2, qwen3, nemotron, gemma, gemma2, gemma3, mixtral, qwen2_moe,
qwen3_moe.
"""

from __future__ import annotations

from minitron_jax.errors import ConfigError
from minitron_jax.families.family import Family
from minitron_jax.families.gemma import GEMMA
from minitron_jax.families.gemma2 import GEMMA2
from minitron_jax.families.gemma3 import GEMMA3
from minitron_jax.families.llama import LLAMA
from minitron_jax.families.mistral import MISTRAL
from minitron_jax.families.mixtral import MIXTRAL
from minitron_jax.families.nemotron import NEMOTRON
from minitron_jax.families.qwen2 import QWEN2
from minitron_jax.families.qwen2_moe import QWEN2_MOE
from minitron_jax.families.qwen3 import QWEN3
from minitron_jax.families.qwen3_moe import QWEN3_MOE

ALL: dict[str, Family] = {f.name: f for f in (
    LLAMA, MISTRAL, QWEN2, QWEN3, NEMOTRON, GEMMA, GEMMA2, GEMMA3, MIXTRAL, QWEN2_MOE, QWEN3_MOE)}
NAMES = tuple(ALL)
# Families whose every layer's MLP is a sparse mixture of experts.
MOE_NAMES = tuple(name for name, family in ALL.items() if family.moe)
BY_MODEL_TYPE = {family.hf_model_type: family for family in ALL.values()}
BY_WRAPPER_TYPE = {family.wrapper_model_type: family for family in ALL.values()
                   if family.wrapper_model_type}


def get(name: str) -> Family:
  if name not in ALL:
    raise ConfigError(f"family={name!r} is not supported; allowed: {NAMES}")
  return ALL[name]


__all__ = ["family", "windows", "experts", *NAMES, "ALL", "NAMES", "MOE_NAMES", "BY_MODEL_TYPE",
           "BY_WRAPPER_TYPE", "Family", "get"]
