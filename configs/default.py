r"""The embedded default: the shipped stdlib teacher, checked, scored and pruned to about half.

Run:
  python -m minitron_jax.main --config=configs/default.py --workdir=/tmp/minitron-default

Variants:
  --config=configs/default.py:family=nemotron   a random tiny model of any supported family
  --config.model.hf_path=DIR                     any Hugging Face model directory
  --config.prune.target.num_layers=2             any target size (absolute)
"""

import pathlib

import ml_collections

import minitron_jax

TEACHER = pathlib.Path(minitron_jax.__file__).parent / "assets" / "stdlib_teacher"


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  options = dict(kv.split("=", 1) for kv in arg.split(",") if kv)
  config = ml_collections.ConfigDict()
  config.stages = ("check", "importance", "prune")
  config.seed = 0

  config.model = ml_collections.ConfigDict()
  # A Hugging Face directory; empty: the preset below with random weights.
  config.model.hf_path = "" if "family" in options else str(TEACHER)
  config.model.preset = "tiny"
  config.model.seed = 0
  config.model.dtype = "float32"
  config.model.remat = "none"
  config.model.overrides = ml_collections.ConfigDict(
      dict(family=options.get("family", "llama"), vocab_size=256, hidden_size=128, num_layers=4,
           num_attention_heads=8, num_key_value_heads=4, head_dim=16, intermediate_size=512))

  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

  config.data = ml_collections.ConfigDict()
  config.data.source = "stdlib"
  config.data.batch_size = 8
  config.data.seq_len = 256
  config.data.num_batches = 4

  config.importance = ml_collections.ConfigDict()
  config.importance.num_samples = 256  # the paper uses 1024; 256 is plenty for a 1M model
  config.importance.batch_size = 32
  config.importance.seq_len = 128
  config.importance.batch_aggregation = "l2"
  config.importance.seq_aggregation = "mean"
  config.importance.block_sizes = (1, 2)
  config.importance.drop_loss = True
  config.importance.drop_block_sizes = (1,)
  config.importance.drop_loss_batches = 2

  config.prune = ml_collections.ConfigDict()
  config.prune.target = ml_collections.ConfigDict(
      dict(num_layers=3, hidden_size=128, num_attention_heads=8, num_key_value_heads=4,
           intermediate_size=256))
  config.prune.head_merging = True
  config.prune.depth_criterion = "block_importance"
  config.prune.contiguous_depth = False
  config.prune.iterative_rounds = 1  # T > 1: re-estimate importance between T pruning steps

  config.export_dtype = "float32"
  return config
