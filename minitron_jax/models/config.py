"""The decoder architecture as one frozen dataclass, with presets for the models we compress.

Every field describes the computation, never the storage: a pruned model keeps `head_dim` while
`hidden_size // num_attention_heads` changes, so nothing here is derived from another size.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from minitron_jax import families
from minitron_jax.errors import ConfigError  # noqa: F401  (config.ConfigError stays importable)

FAMILIES = families.NAMES
# Families whose every layer's MLP is a sparse mixture of experts.
MOE_FAMILIES = families.MOE_NAMES
ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "relu2")
# rms1p: Gemma's RMSNorm, whose stored scale is offset by one (it multiplies by 1 + w).
NORMS = ("rms", "rms1p", "layernorm1p")
DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "full", "dots")
ROPE_KINDS = ("linear", "llama3")
# auto: splash on TPU, cuDNN on GPU where it expresses the mask and tokamax for packed rows where
# installed, blockwise elsewhere (attention.py).
ATTENTION_IMPLEMENTATIONS = ("auto", "naive", "blockwise", "cudnn", "splash", "tokamax")
# Expert dispatch (moe.py): auto, jax.lax.ragged_dot, tokamax's grouped matmul, capacity buffers.
MOE_DISPATCHES = ("auto", "grouped", "tokamax", "capacity")
# What one layer of a hybrid model (Nemotron-H) is: a single block with its own pre-norm and
# residual (models/hybrid.py).
LAYER_KINDS = ("attention", "mamba", "mlp")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency rescaling. `llama3` is the Llama 3.1 scheme; `linear` divides every frequency."""

  kind: str
  factor: float
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.kind not in ROPE_KINDS:
      raise ConfigError(f"rope scaling kind={self.kind!r} is not supported; allowed: {ROPE_KINDS}")
    if self.factor <= 0:
      raise ConfigError(f"rope scaling factor={self.factor} must be positive")


@dataclasses.dataclass(frozen=True)
class Mamba2Config:
  """The sizes and options of a Mamba-2 mixer (the Hugging Face names in comments)."""

  num_heads: int  # mamba_num_heads
  head_dim: int  # mamba_head_dim
  state_size: int  # ssm_state_size
  num_groups: int  # n_groups
  conv_kernel: int = 4  # conv_kernel
  chunk_size: int = 128  # chunk_size
  conv_bias: bool = True  # use_conv_bias
  # dt is clamped to [low, high] after softplus (time_step_limit); high may be inf.
  time_step_limit: tuple[float, float] = (0.0, float("inf"))
  activation: str = "silu"  # mamba_hidden_act

  def __post_init__(self):
    for name in ("num_heads", "head_dim", "state_size", "num_groups", "conv_kernel",
                 "chunk_size"):
      value = getattr(self, name)
      if not (isinstance(value, int) and value > 0):
        raise ConfigError(f"mamba {name}={value!r} must be a positive integer")
    if self.num_heads % self.num_groups:
      raise ConfigError(f"mamba num_heads={self.num_heads} must be a multiple of "
                        f"num_groups={self.num_groups}")
    if self.activation not in ACTIVATIONS:
      raise ConfigError(f"mamba activation={self.activation!r} is not supported; allowed: "
                        f"{ACTIVATIONS}")
    low, high = self.time_step_limit
    if not 0.0 <= low <= high:
      raise ConfigError(f"mamba time_step_limit={self.time_step_limit} must be 0 <= low <= high")

  @property
  def intermediate_size(self) -> int:
    return self.num_heads * self.head_dim

  def state_bytes(self, batch: int, dtype_bytes: int = 4) -> int:
    """Bytes a generation of `batch` sequences keeps for one mixer: its scan state and its last
    conv_kernel - 1 convolution inputs, whatever the sequence length."""
    scan = self.num_heads * self.head_dim * self.state_size
    conv = (self.conv_kernel - 1) * (self.intermediate_size + 2 * self.num_groups * self.state_size)
    return batch * (scan + conv) * dtype_bytes


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A pre-norm decoder-only transformer covering Llama 3.x, Mistral, Qwen2/3, Nemotron, the
  Gemma 1/2/3 text models and the Mixtral / Qwen2-MoE / Qwen3-MoE mixtures of experts."""

  family: str
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  intermediate_size: int
  activation: str = "silu"
  gated_mlp: bool = True
  norm: str = "rms"
  norm_eps: float = 1e-5
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False
  # Gemma 2/3 sandwich norms: attention and MLP outputs are normalised again before the residual add.
  post_norms: bool = False
  # Token embeddings are multiplied by this (Gemma: sqrt of the unpruned hidden size); None: 1.
  embedding_scale: float | None = None
  # Attention scores are scaled by query_pre_attn_scalar ** -0.5 (Gemma 2/3); None: head_dim.
  query_pre_attn_scalar: float | None = None
  # cap * tanh(x / cap) on attention scores and on final logits (Gemma 2); None: no capping.
  attn_logit_softcap: float | None = None
  final_logit_softcap: float | None = None
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  partial_rotary_factor: float = 1.0
  # Keys further back than this are masked; None attends to the whole causal prefix.
  sliding_window: int | None = None
  # Which layers use the window (Qwen2/3 mix both kinds); None means every layer.
  sliding_window_layers: tuple[bool, ...] | None = None
  # The RoPE base of sliding-window layers, unscaled (Gemma 3's local layers); None: they share
  # rope_theta and rope_scaling with the global layers.
  local_rope_theta: float | None = None
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 8192
  # Mixture of experts (every layer; 0 experts: a dense MLP of intermediate_size). With experts,
  # intermediate_size is only carried for the Hugging Face config (Qwen's dense width).
  num_experts: int = 0
  num_experts_per_tok: int = 0
  moe_intermediate_size: int = 0
  # Renormalise the top-k routing probabilities to sum to one (Mixtral always does).
  norm_topk_prob: bool = False
  # Qwen2-MoE: a dense expert every token passes through, scaled by sigmoid(x . gate); 0: none.
  shared_expert_intermediate_size: int = 0
  # Compute options; they never change what is saved.
  # Expert dispatch (moe.py): None drops nothing (grouped matmul on TPU, every token's slot
  # elsewhere); a factor c gives each expert c x its even share of a batch's routed tokens in a
  # batched matmul, dropping overflow.
  moe_capacity_factor: float | None = None
  # Which expert computation (moe.py): "auto", or one of MOE_DISPATCHES to force it.
  moe_dispatch: str = "auto"
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "none"
  attention: str = "auto"
  # Queries and keys per tile of the blockwise and splash kernels; memory grows as T x this.
  attention_block_size: int = 512
  # Hybrid models (Nemotron-H): layer i is one block of kind layer_kinds[i] (LAYER_KINDS), each
  # with its own pre-norm and residual; None: every layer is attention then MLP (or experts).
  layer_kinds: tuple[str, ...] | None = None
  # The Mamba-2 mixer of the `mamba` layers.
  mamba: Mamba2Config | None = None
  # False: attention without rotary embeddings (Nemotron-H, whose Mamba layers carry position).
  rotary: bool = True
  # Hugging Face fields we do not interpret but carry through export (token ids and the like).
  hf_extras: tuple[tuple[str, Any], ...] = ()

  def __post_init__(self):
    def need(condition: bool, message: str):
      if not condition:
        raise ConfigError(message)

    need(self.family in FAMILIES, f"family={self.family!r} is not supported; allowed: {FAMILIES}")
    for name in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "intermediate_size"):
      value = getattr(self, name)
      need(isinstance(value, int) and value > 0, f"{name}={value!r} must be a positive integer")
    need(self.num_attention_heads % self.num_key_value_heads == 0,
         f"num_attention_heads={self.num_attention_heads} must be a multiple of "
         f"num_key_value_heads={self.num_key_value_heads}")
    need(self.activation in ACTIVATIONS,
         f"activation={self.activation!r} is not supported; allowed: {ACTIVATIONS}")
    need(self.norm in NORMS, f"norm={self.norm!r} is not supported; allowed: {NORMS}")
    need(self.dtype in DTYPES, f"dtype={self.dtype!r} is not supported; allowed: {DTYPES}")
    need(self.param_dtype in DTYPES,
         f"param_dtype={self.param_dtype!r} is not supported; allowed: {DTYPES}")
    need(self.remat in REMAT_POLICIES,
         f"remat={self.remat!r} is not supported; allowed: {REMAT_POLICIES}")
    need(self.attention in ATTENTION_IMPLEMENTATIONS,
         f"attention={self.attention!r} is not supported; allowed: {ATTENTION_IMPLEMENTATIONS}")
    need(isinstance(self.attention_block_size, int) and self.attention_block_size > 0,
         f"attention_block_size={self.attention_block_size!r} must be a positive integer")
    need(0.0 < self.partial_rotary_factor <= 1.0,
         f"partial_rotary_factor={self.partial_rotary_factor} must be in (0, 1]")
    need(self.rotary_dim % 2 == 0 and self.rotary_dim > 0,
         f"rotary dim {self.rotary_dim} (head_dim={self.head_dim} x partial_rotary_factor="
         f"{self.partial_rotary_factor}) must be a positive even number")
    need(self.sliding_window is None or self.sliding_window > 0,
         f"sliding_window={self.sliding_window} must be positive or None")
    if self.sliding_window_layers is not None:
      need(len(self.sliding_window_layers) == self.num_layers,
           f"sliding_window_layers has {len(self.sliding_window_layers)} entries; "
           f"num_layers={self.num_layers}")
    for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size",
                 "shared_expert_intermediate_size"):
      value = getattr(self, name)
      need(isinstance(value, int) and value >= 0, f"{name}={value!r} must be a whole number")
    if self.num_experts:
      need(1 <= self.num_experts_per_tok <= self.num_experts,
           f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, num_experts="
           f"{self.num_experts}]")
      need(self.moe_intermediate_size > 0,
           f"moe_intermediate_size={self.moe_intermediate_size} must be positive with experts")
      need(self.gated_mlp, "gated_mlp=False with experts; allowed: gated experts")
    else:
      need(not (self.num_experts_per_tok or self.moe_intermediate_size
                or self.shared_expert_intermediate_size),
           "num_experts_per_tok, moe_intermediate_size and shared_expert_intermediate_size "
           "need num_experts > 0")
    if self.layer_kinds is not None:
      need(len(self.layer_kinds) == self.num_layers,
           f"layer_kinds has {len(self.layer_kinds)} entries; num_layers={self.num_layers}")
      unknown = sorted(set(self.layer_kinds) - set(LAYER_KINDS))
      need(not unknown, f"layer kinds {unknown} are not supported; allowed: {LAYER_KINDS}")
      need(not self.num_experts, "num_experts with layer_kinds: hybrid expert layers are not "
           "supported yet; allowed: 0")
      need(not self.post_norms, "post_norms with layer_kinds; allowed: False")
    has_mamba = self.layer_kinds is not None and "mamba" in self.layer_kinds
    need(has_mamba == (self.mamba is not None),
         "mamba must be set exactly when layer_kinds holds a 'mamba' layer")
    need(self.moe_dispatch in MOE_DISPATCHES,
         f"moe_dispatch={self.moe_dispatch!r} is not supported; allowed: {MOE_DISPATCHES}")
    need(self.moe_capacity_factor is None or self.moe_capacity_factor > 0,
         f"moe_capacity_factor={self.moe_capacity_factor!r} must be positive or None")
    for name in ("embedding_scale", "query_pre_attn_scalar", "attn_logit_softcap",
                 "final_logit_softcap", "local_rope_theta"):
      value = getattr(self, name)
      need(value is None or value > 0, f"{name}={value!r} must be positive or None")

  @property
  def rotary_dim(self) -> int:
    return int(self.head_dim * self.partial_rotary_factor)

  @property
  def queries_per_group(self) -> int:
    return self.num_attention_heads // self.num_key_value_heads

  @property
  def is_moe(self) -> bool:
    return self.num_experts > 0

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    """JSON-ready fields (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(self)))

  @classmethod
  def from_dict(cls, fields: dict[str, Any]) -> "ModelConfig":
    fields = dict(fields)
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise ConfigError(f"model config fields {unknown} are unknown")
    if fields.get("rope_scaling") is not None:
      fields["rope_scaling"] = RopeScaling(**fields["rope_scaling"])
    if fields.get("sliding_window_layers") is not None:
      fields["sliding_window_layers"] = tuple(fields["sliding_window_layers"])
    if fields.get("layer_kinds") is not None:
      fields["layer_kinds"] = tuple(fields["layer_kinds"])
    if fields.get("mamba") is not None:
      mamba = dict(fields["mamba"])
      if "time_step_limit" in mamba:
        mamba["time_step_limit"] = tuple(mamba["time_step_limit"])
      fields["mamba"] = Mamba2Config(**mamba)
    fields["hf_extras"] = tuple(
        (k, tuple(v) if isinstance(v, list) else v) for k, v in fields.get("hf_extras", ()))
    return cls(**fields)

  def layer_windows(self) -> tuple[int | None, ...]:
    """The attention window of each layer (None: unlimited)."""
    if self.sliding_window is None:
      return (None,) * self.num_layers
    if self.sliding_window_layers is None:
      return (self.sliding_window,) * self.num_layers
    return tuple(self.sliding_window if s else None for s in self.sliding_window_layers)

  def local_rope_layers(self) -> tuple[bool, ...]:
    """Which layers rotate with local_rope_theta (the sliding-window ones, when it is set)."""
    if self.local_rope_theta is None:
      return (False,) * self.num_layers
    return tuple(w is not None for w in self.layer_windows())

  def _norm_params(self) -> int:
    return self.hidden_size * (2 if self.norm == "layernorm1p" else 1)

  def _attention_params(self) -> int:
    d, h = self.hidden_size, self.head_dim
    n, k = self.num_attention_heads, self.num_key_value_heads
    attn = d * h * (n + 2 * k) + n * h * d
    attn += h * (n + 2 * k) if self.qkv_bias else 0
    attn += d if self.o_bias else 0
    attn += 2 * h if self.qk_norm else 0
    return attn

  def _mlp_params(self, active: bool) -> int:
    d, f = self.hidden_size, self.intermediate_size
    if self.is_moe:
      experts = self.num_experts_per_tok if active else self.num_experts
      mlp = experts * 3 * d * self.moe_intermediate_size + d * self.num_experts  # + router
      if self.shared_expert_intermediate_size:
        mlp += 3 * d * self.shared_expert_intermediate_size + d  # + its sigmoid gate
      return mlp
    mlp = d * f * (3 if self.gated_mlp else 2)
    return mlp + ((f * (2 if self.gated_mlp else 1) + d) if self.mlp_bias else 0)

  def _mamba_params(self) -> int:
    d, m = self.hidden_size, self.mamba
    conv = m.intermediate_size + 2 * m.num_groups * m.state_size
    return (d * (m.intermediate_size + conv + m.num_heads)  # in_proj: z, x, B, C, dt
            + m.conv_kernel * conv + (conv if m.conv_bias else 0)
            + 3 * m.num_heads + m.intermediate_size  # A_log, D, dt_bias; gated norm
            + m.intermediate_size * d)  # out_proj

  def _layers_params(self, active: bool) -> int:
    """Every layer's weights: attention + MLP with their norms, or for a hybrid model one block
    and its pre-norm per layer."""
    if self.layer_kinds is None:
      norms = (4 if self.post_norms else 2) * self._norm_params()
      return self.num_layers * (norms + self._attention_params() + self._mlp_params(active))
    block = {"attention": self._attention_params, "mlp": lambda: self._mlp_params(active),
             "mamba": self._mamba_params}
    return sum(self._norm_params() + block[kind]() for kind in self.layer_kinds)

  def _outside_layers_params(self) -> int:
    """The embedding, the untied head and the final norm."""
    embed = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
    return embed + self._norm_params()

  def num_params(self) -> int:
    """Exact parameter count of the weights this config describes (tied head counted once)."""
    return self._outside_layers_params() + self._layers_params(active=False)

  def num_active_params(self) -> int:
    """Parameters one token computes with: num_params less the experts it is not routed to
    (embeddings and the LM head count in full, as model cards count them)."""
    return self._outside_layers_params() + self._layers_params(active=True)

  def kv_cache_bytes(self, batch: int, seq_len: int, dtype: str = "bfloat16") -> int:
    """Bytes of the keys and values a generation of `batch` sequences of `seq_len` tokens keeps;
    a sliding-window layer keeps the last window - 1 (the next token attends to them and to
    itself), as transformers' cache does.
    A hybrid model's Mamba and MLP layers keep no keys or values (see recurrent_state_bytes)."""
    per_token = 2 * self.num_key_value_heads * self.head_dim * dtype_bytes(dtype)
    windows = self.layer_windows()
    if self.layer_kinds is not None:
      windows = [w for w, kind in zip(windows, self.layer_kinds) if kind == "attention"]
    kept = sum(seq_len if w is None else min(seq_len, w - 1) for w in windows)
    return batch * kept * per_token

  def recurrent_state_bytes(self, batch: int, dtype: str = "bfloat16") -> int:
    """Bytes of the Mamba layers' scan states and convolution windows a generation of `batch`
    sequences keeps: constant in sequence length (0 without Mamba layers)."""
    if self.mamba is None:
      return 0
    return self.layer_kinds.count("mamba") * self.mamba.state_bytes(batch, dtype_bytes(dtype))

  def memory_bytes(self, batch: int, seq_len: int, dtype: str = "bfloat16") -> int:
    """Serving memory: every weight at `dtype` plus the KV cache of `kv_cache_bytes` and the
    Mamba layers' states, as ModelOpt's `memory_mb` counts them."""
    return (self.num_params() * dtype_bytes(dtype) + self.kv_cache_bytes(batch, seq_len, dtype)
            + self.recurrent_state_bytes(batch, dtype))


# Bytes per element of the dtypes a memory budget can be counted at.
MEMORY_DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8": 1, "int8": 1}


def dtype_bytes(dtype: str) -> int:
  if dtype not in MEMORY_DTYPES:
    raise ConfigError(f"memory dtype={dtype!r} is not supported; allowed: {sorted(MEMORY_DTYPES)}")
  return MEMORY_DTYPES[dtype]


def preset(name: str, **overrides) -> ModelConfig:
  """A named real architecture (its fields live in its family's file), with overrides."""
  if name not in PRESETS:
    raise ConfigError(f"preset={name!r} is unknown; allowed: {sorted(PRESETS)}")
  return PRESETS[name](**overrides)


def _named(family: families.Family, name: str):
  def build(**overrides) -> ModelConfig:
    return ModelConfig.from_dict(family.preset_fields(name)).replace(**overrides)
  build.__name__ = name
  return build


def tiny(family: str = "llama", **overrides) -> ModelConfig:
  """A few-hundred-thousand-parameter model of the given family, for tests and smoke runs (its
  sizes and traits come from the family's file in families/)."""
  fields = families.get(family).tiny_fields(overrides.get("hidden_size"),
                                            overrides.get("num_layers"))
  return ModelConfig(**{**fields, **overrides})


# preset name -> function(**overrides) -> ModelConfig: the families' named architectures and
# each family's tiny test model.
PRESETS = {name: _named(family, name) for family in families.ALL.values()
           for name in family.presets}
PRESETS["tiny"] = tiny
