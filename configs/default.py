r"""The embedded default: the shipped stdlib teacher, scored, pruned to about half and distilled.

Run:
  python -m minitron_jax.main --config=configs/default.py --workdir=/tmp/minitron-default

Variants:
  --config=configs/default.py:family=nemotron   a random tiny model of any supported family
  --config.model.hf_path=DIR                     any Hugging Face model directory (its
                                                 tokenizer.json is used when tokenizer='')
  --config.prune.target.num_layers=2             any target size (absolute)
  --config.distill.loss.logit_loss=reverse_kl    any loss setting (see minitron_jax/losses.py)
"""

import pathlib

import ml_collections

import minitron_jax

TEACHER = pathlib.Path(minitron_jax.__file__).parent / "assets" / "stdlib_teacher"


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  options = dict(kv.split("=", 1) for kv in arg.split(",") if kv)
  config = ml_collections.ConfigDict()
  config.stages = ("check", "importance", "prune", "distill")
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
  # "bytes" (the shipped teacher reads UTF-8 bytes), a tokenizer.json path, or "" to use the
  # tokenizer.json of model.hf_path.
  config.tokenizer = "bytes"

  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

  # minitron_jax.data.DataConfig fields.
  config.data = ml_collections.ConfigDict(dict(
      source="stdlib", seq_len=128, batch_size=16, seed=0, tfds_name="", data_dir=None,
      paths=(), validation_paths=(), text_field="text"))
  config.eval_batches = 4  # validation batches every stage reports its loss on

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

  config.distill = ml_collections.ConfigDict()
  config.distill.steps = 200
  config.distill.batch_size = 16
  config.distill.seq_len = 128
  config.distill.dtype = "float32"
  config.distill.remat = "none"
  config.distill.log_every = 20
  config.distill.eval_every = 100
  config.distill.checkpoint_every = 50
  config.distill.keep_checkpoints = 2
  # minitron_jax.distill.OptimizerConfig fields; the paper's 2e-4 -> 4.5e-7 suits billion-scale
  # models, a 0.5M-parameter student learns faster with a larger peak.
  config.distill.optimizer = ml_collections.ConfigDict(dict(
      peak_lr=2e-3, end_lr=4.5e-7, warmup_steps=20, weight_decay=0.1, clip_norm=1.0,
      accumulation_steps=1))
  # minitron_jax.losses.LossConfig fields; the paper's best practice: logit-only forward KL.
  config.distill.loss = ml_collections.ConfigDict(dict(
      logit_loss="forward_kl", temperature=1.0, top_k=0, logit_weight=1.0, ce_weight=0.0,
      hidden_loss="none", hidden_pairs=((-1, -1),), embedding_term=False, hidden_weight=1.0,
      dynamic_alpha=True, fused=True, chunk_size=1024))

  config.export_dtype = "float32"
  return config
