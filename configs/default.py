r"""The embedded default: a tiny Llama-style model checked end to end on the stdlib corpus.

Run:
  python -m minitron_jax.main --config=configs/default.py --workdir=/tmp/minitron-default

Variants (`--config=configs/default.py:family=nemotron`): any supported family.
Point `--config.model.hf_path=DIR` at a Hugging Face model directory to check a real checkpoint.
"""

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  options = dict(kv.split("=", 1) for kv in arg.split(",") if kv)
  config = ml_collections.ConfigDict()
  config.stages = ("check",)
  config.seed = 0

  config.model = ml_collections.ConfigDict()
  config.model.hf_path = ""  # a Hugging Face directory; empty: preset with random weights
  config.model.preset = "tiny"
  config.model.seed = 0
  config.model.dtype = "float32"
  config.model.remat = "none"
  config.model.overrides = ml_collections.ConfigDict(
      dict(family=options.get("family", "llama"), vocab_size=256, hidden_size=128, num_layers=4,
           num_attention_heads=8, num_key_value_heads=2, head_dim=32, intermediate_size=384))

  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

  config.data = ml_collections.ConfigDict()
  config.data.source = "stdlib"
  config.data.batch_size = 8
  config.data.seq_len = 256
  config.data.num_batches = 4

  config.export_dtype = "float32"
  return config
