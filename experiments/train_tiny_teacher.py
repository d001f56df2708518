r"""Trains the small byte-level teacher shipped in minitron_jax/assets/stdlib_teacher.

It is the model with learned structure that pruning tests and the embedded default start from:
a Llama-style decoder trained on the Python standard library's source (train split).

  python experiments/train_tiny_teacher.py --out=minitron_jax/assets/stdlib_teacher
"""

from absl import app, flags

from minitron_jax.models import config as config_lib
from minitron_jax.checkpoints import hf
from minitron_jax.inputs import corpus, tokenizer
from minitron_jax.models import model
from minitron_jax.training import pretrain

_OUT = flags.DEFINE_string("out", "minitron_jax/assets/stdlib_teacher", "HF output directory.")
_STEPS = flags.DEFINE_integer("steps", 1000, "Training steps.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Sequences per step.")
_SEQ = flags.DEFINE_integer("seq_len", 128, "Tokens per sequence.")
_SEED = flags.DEFINE_integer("seed", 0, "Init and data seed.")


def teacher_config() -> config_lib.ModelConfig:
  return config_lib.tiny("llama", vocab_size=corpus.BYTE_VOCAB, hidden_size=128, num_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=16,
                         intermediate_size=512)


def main(argv):
  del argv
  # Its context is what it was trained on: other tools (lm-eval, vLLM) read this field.
  config = teacher_config().replace(max_position_embeddings=_SEQ.value)
  params = model.init(config, _SEED.value)
  data = corpus.stdlib_bytes("train")
  batches = corpus.byte_windows(data, _BATCH.value, _SEQ.value + 1, _STEPS.value, _SEED.value)
  params = pretrain.train(config, params, batches, steps=_STEPS.value)
  validation = corpus.byte_windows(corpus.stdlib_bytes("validation"), 16, _SEQ.value + 1, 8, 1)
  losses = [float(pretrain.next_token_loss(config, params, b)) for b in validation]
  print(f"validation loss {sum(losses) / len(losses):.4f} over {len(losses)} batches")
  hf.save(_OUT.value, config, params, tokenizer=tokenizer.ByteTokenizer())


if __name__ == "__main__":
  app.run(main)
