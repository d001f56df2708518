"""Gemma: GeGLU, RMSNorm with a (1 + w) scale, embeddings scaled by sqrt(hidden), a tied head and
head_dim 256 unless stated. Gemma 2 and 3 start from `TRAITS` and add `sandwich_to_hf`."""

from minitron_jax.families import windows
from minitron_jax.families.family import Family

# What Gemma 1/2/3 share, as Family fields.
TRAITS = dict(norm="rms1p", embedding_scaled=True, default_activation="gelu_pytorch_tanh",
              default_head_dim=256, refused_fields=("use_bidirectional_attention",))


def to_hf(config, hf):
  return {**hf, "attention_bias": config.qkv_bias}


def sandwich_to_hf(config, hf):
  """Gemma 2/3's fields: post-norms' scalar and caps, per-layer windows, the activation's name."""
  as_int = lambda x: int(x) if float(x).is_integer() else x  # transformers types it int
  hf = {**hf, "hidden_activation": hf["hidden_act"],
        "query_pre_attn_scalar": as_int(config.query_pre_attn_scalar or config.head_dim),
        "attn_logit_softcapping": config.attn_logit_softcap,
        "final_logit_softcapping": config.final_logit_softcap,
        "sliding_window": config.sliding_window or config.max_position_embeddings,
        "layer_types": windows.layer_types(config), "use_bidirectional_attention": False}
  del hf["hidden_act"]
  return to_hf(config, hf)


GEMMA = Family(name="gemma", architecture="GemmaForCausalLM", **TRAITS,
               activation_aliases={"gelu": "gelu_pytorch_tanh"},  # as transformers' GemmaConfig
               fields_to_hf=to_hf)
