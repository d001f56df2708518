"""The model flags the benchmark scripts share (imported as a sibling module)."""

from absl import flags

from minitron_jax.tools import benchmark

PRESET = flags.DEFINE_string("preset", "tiny", "Model preset (minitron_jax.models.config.PRESETS).")
HIDDEN = flags.DEFINE_integer("hidden", 512, "tiny preset: hidden size.")
LAYERS = flags.DEFINE_integer("layers", 8, "tiny preset: layers.")
VOCAB = flags.DEFINE_integer("vocab", 32768, "tiny preset: vocabulary.")
BATCH = flags.DEFINE_integer("batch", 4, "Sequences per batch.")
SEQ = flags.DEFINE_integer("seq", 512, "Tokens per sequence.")
DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")


def model_config():
  """The configured model with the chosen compute dtype."""
  return benchmark.model_config(PRESET.value, HIDDEN.value, LAYERS.value,
                                VOCAB.value).replace(dtype=DTYPE.value)
