"""Gemma 2: Gemma with sandwich norms, capped attention and final logits, and sliding-window
layers alternating with global ones."""

from minitron_jax.families import gemma, windows
from minitron_jax.families.family import Family


def tiny(hidden: int, layers: int) -> dict:
  """Caps low enough to bite on a random model; local and global layers alternate."""
  del hidden
  return dict(query_pre_attn_scalar=24.0, attn_logit_softcap=5.0, final_logit_softcap=3.0,
              sliding_window=8, sliding_window_layers=windows.every_nth_global(layers, 2))


PRESETS = {
    "gemma2_2b": dict(
        vocab_size=256000, hidden_size=2304, num_layers=26, num_attention_heads=8,
        num_key_value_heads=4, head_dim=256, intermediate_size=9216, attn_logit_softcap=50.0,
        final_logit_softcap=30.0, rope_theta=10000.0, sliding_window=4096,
        sliding_window_layers=windows.every_nth_global(26, 2), max_position_embeddings=8192),
}

GEMMA2 = Family(
    name="gemma2", architecture="Gemma2ForCausalLM", **gemma.TRAITS, post_norms=True,
    activation_field="hidden_activation", default_softcaps=(50.0, 30.0),  # Gemma2Config's
    allows=frozenset({"attn_softcap", "sliding_window", "per_layer_windows"}),
    windows=lambda hf, layers, family: windows.gemma(hf, layers, pattern=2),
    fields_to_hf=gemma.sandwich_to_hf, tiny=tiny, presets=PRESETS)
