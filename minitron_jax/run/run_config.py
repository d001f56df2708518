"""The full settings schema of a main-job run, at the embedded default's values.

Config files in configs/ start from `base_config()` and change what their run needs; `runlocal`
shrinks any of them to a CPU smoke test (`--config=configs/NAME.py:runlocal`).
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Iterable

import ml_collections

from minitron_jax.core.assets import STDLIB_TEACHER
from minitron_jax.training.distill import OptimizerConfig
from minitron_jax.objectives.losses import LossConfig

# The architectures of Minitron Table 2 / METHOD §6, as absolute prune targets.
MINITRON_8B = dict(num_layers=32, hidden_size=4096, num_attention_heads=48,
                   num_key_value_heads=8, intermediate_size=16384)
MINITRON_4B = dict(num_layers=32, hidden_size=3072, num_attention_heads=24,
                   num_key_value_heads=8, intermediate_size=9216)
LLAMA_4B_WIDTH = dict(num_layers=32, hidden_size=3072, num_attention_heads=32,
                      num_key_value_heads=8, intermediate_size=9216)
LLAMA_4B_DEPTH = dict(num_layers=16, hidden_size=4096, num_attention_heads=32,
                      num_key_value_heads=8, intermediate_size=14336)

# Lightweight retraining: ~1.8B tokens in ~400 steps of 1152 x 4096 tokens; full retraining:
# ~94B tokens (paper §4.2).
GLOBAL_BATCH = 1152
LIGHT_STEPS = 400
FULL_STEPS = 20_000


def parse_arg(arg: str) -> dict[str, str]:
  """'a=1,runlocal' -> {'a': '1', 'runlocal': 'True'} (big_vision-style config arguments)."""
  return dict(kv.split("=", 1) if "=" in kv else (kv, "True") for kv in arg.split(",") if kv)


def unknown_settings(config: ml_collections.ConfigDict, paths: Iterable[str]) -> list[str]:
  """One line per override path (`distill.steps` of `--config.distill.steps=5`) that names no
  setting of `config`, with the nearest one that exists."""
  problems = []
  for path in paths:
    names = path.split(".")
    section = config
    for i, name in enumerate(names):
      key = name.split("[", 1)[0]  # `compression[0]`: what lies inside a tuple is not a setting
      walked = ".".join(["config", *names[:i]])
      if not isinstance(section, ml_collections.ConfigDict):
        problems.append(f"--config.{path}: {walked} is a value ({section!r}), not a section of "
                        "settings")
        break
      if key not in section:
        nearest = difflib.get_close_matches(key, list(section.keys()), n=1)
        fix = (f"did you mean --config.{'.'.join([*names[:i], nearest[0], *names[i + 1:]])}?"
               if nearest else f"allowed: {', '.join(sorted(section.keys()))}")
        problems.append(f"--config.{path}: {walked} has no setting {key!r}; {fix}")
        break
      if key != name:
        break
      section = section[key]
  return problems


def settings_section(cls, **changes) -> ml_collections.ConfigDict:
  """A section holding every field of the frozen settings dataclass `cls` at its default, with
  `changes`: the dataclass is the schema, so a new field is a setting without restating it."""
  defaults = {field.name: getattr(cls(), field.name) for field in dataclasses.fields(cls)}
  unknown = sorted(set(changes) - set(defaults))
  if unknown:
    raise ValueError(f"{cls.__name__} has no fields {unknown}")
  return ml_collections.ConfigDict({**defaults, **changes})


def base_config(options: dict[str, str] | None = None) -> ml_collections.ConfigDict:
  """Every setting of a run, at the embedded default's values (see configs/default.py)."""
  options = options or {}
  config = ml_collections.ConfigDict()
  config.stages = ("check", "importance", "prune", "distill", "evaluate", "report")
  config.seed = 0

  config.model = ml_collections.ConfigDict()
  # A Hugging Face directory; empty: the preset below with random weights.
  config.model.hf_path = "" if "family" in options else str(STDLIB_TEACHER)
  config.model.preset = "tiny"
  config.model.seed = 0
  config.model.dtype = "float32"
  config.model.remat = "none"
  # Attention kernel (minitron_jax/models/attention.py; "auto" picks per backend) and its tile size.
  config.model.attention = "auto"
  config.model.attention_block_size = 512
  # Mixtures of experts: 0 dispatches exactly (grouped matmul); c > 0 gives each expert c x its
  # even share of a batch's tokens in one batched matmul and drops the overflow (moe.py).
  config.model.moe_capacity_factor = 0.0
  # How experts are computed: "auto" (per backend, moe.py), "grouped", "tokamax" or "capacity".
  config.model.moe_dispatch = "auto"
  # Real-model configs set this: a run on a random 15B model is a mistake, not a default.
  config.model.require_checkpoint = False
  # What to tell the user when a required checkpoint is absent (e.g. the pip line that ships it).
  config.model.checkpoint_hint = ""
  config.model.overrides = ml_collections.ConfigDict(
      dict(family=options.get("family", "llama"), vocab_size=256, hidden_size=128, num_layers=4,
           num_attention_heads=8, num_key_value_heads=4, head_dim=16, intermediate_size=512))
  # "bytes" (the shipped teacher reads UTF-8 bytes), a tokenizer.json path, or "" for the model's
  # own: the tokenizer.json of model.hf_path, or the tokenizer its GGUF file embeds.
  config.tokenizer = "bytes"

  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1))

  # minitron_jax.inputs.data.DataConfig fields. source: stdlib, tfds, text, jsonl, parquet or arrow
  # (files from paths), or a weighted mixture naming its own files, e.g.
  # "parquet:/data/web/*.parquet@0.7,arrow:/data/code#content@0.3" (minitron_jax/inputs/source_spec.py).
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
  # Mixtures of experts: rank experts by routed contribution or routing frequency.
  config.prune.expert_criterion = "contribution"
  config.prune.contiguous_depth = False
  config.prune.iterative_rounds = 1  # T > 1: re-estimate importance between T pruning steps
  # Paper Table 12's baseline: the target architecture with fresh random weights (model.seed+1).
  config.prune.reinitialize = False

  # Offline teacher: "teacher_logits" in stages stores the teacher's top-k log-probabilities
  # over the distillation stream once; search and distill then read them instead of running it.
  config.teacher_logits = ml_collections.ConfigDict(dict(
      k=128, dtype="bfloat16", rows_per_shard=256, batch_size=8))

  config.distill = ml_collections.ConfigDict()
  config.distill.steps = 500
  config.distill.batch_size = 16
  config.distill.seq_len = 128
  config.distill.dtype = "float32"
  config.distill.remat = "none"
  config.distill.log_every = 20
  config.distill.eval_every = 100
  config.distill.checkpoint_every = 50
  config.distill.keep_checkpoints = 2
  # Steps with a non-finite loss or gradient norm to skip (leaving the weights untouched) before
  # the run stops as diverged; 0: the first one stops it. Skips are logged and counted in the
  # stage's summary.json (skipped_steps). Teacher correction and search retraining use it too.
  config.distill.max_bad_steps = 0
  # Every minitron_jax.training.distill.OptimizerConfig field; the paper's 2e-4 -> 4.5e-7 suits
  # billion-scale models, a 0.5M-parameter student learns faster with a larger peak.
  config.distill.optimizer = settings_section(OptimizerConfig, peak_lr=2e-3, warmup_steps=20)
  # Every minitron_jax.objectives.losses.LossConfig field at its default, the paper's best practice:
  # logit-only forward KL. router_aux_loss_coef > 0 adds a mixture-of-experts student's
  # load-balancing loss (e.g. 0.001, Qwen3-MoE's training value); a dense student refuses it.
  config.distill.loss = settings_section(LossConfig)

  # Multi-stage compression: a tuple of dicts(name, target, teacher="original"|"previous",
  # distill_steps); empty: one stage with prune.target.
  config.compression = ()

  # Lightweight architecture search (paper §3); runs when "search" is in stages. space holds
  # minitron_jax.compress.search.SearchSpace fields. Constraints: budget (total parameters),
  # active_params (per token) and memory (bytes: weights and the KV cache of memory_batch x
  # memory_seq_len tokens at memory_dtype); 0 leaves one unconstrained, a candidate must meet
  # every other one within ± tolerance. num_experts, moe_intermediate_size and
  # shared_expert_intermediate_size are the axes of a mixture of experts (instead of the MLP's).
  config.search = ml_collections.ConfigDict()
  config.search.space = ml_collections.ConfigDict(dict(
      num_layers=(3, 4), hidden_size=(96, 128), num_attention_heads=(4, 8),
      num_key_value_heads=(), intermediate_size=(), mlp_expansion=(2.0, 3.0, 4.0), round_to=8,
      num_experts=(), moe_intermediate_size=(), shared_expert_intermediate_size=(),
      budget=520_000, active_params=0, memory=0, memory_batch=1, memory_seq_len=4096,
      memory_dtype="bfloat16", tolerance=0.1))
  config.search.retrain_steps = 60
  config.search.max_candidates = 0  # 0: every feasible candidate, as in the paper
  config.search.eval_steps = (20, 40, 60)
  # "": rank by validation loss; "lm_eval:TASK[/METRIC]": by a harness score (search_score.py),
  # after retraining (score_at="retrained") or on the pruned candidates alone ("pruned").
  config.search.score = ""
  config.search.score_at = "retrained"

  # Teacher correction (2408.11796); runs when "teacher_correction" is in stages.
  config.teacher_correction = ml_collections.ConfigDict()
  config.teacher_correction.steps = 100
  config.teacher_correction.optimizer = settings_section(
      OptimizerConfig, peak_lr=3e-4, end_lr=3e-5, warmup_steps=10, weight_decay=0.0)

  config.evaluate = ml_collections.ConfigDict()
  # name -> source ("stdlib_next_line", a JSONL path or tfds:NAME) and its loader arguments.
  config.evaluate.tasks = ml_collections.ConfigDict(dict(
      next_line=dict(source="stdlib_next_line", num_examples=200, num_choices=4, seed=0,
                     mode="context")))
  config.evaluate.batch_size = 32
  config.evaluate.max_length = 128  # the shipped teacher was trained on 128-byte windows
  # lm-evaluation-harness (stages/evaluate.py): its tasks, and ours run through it (own_tasks: the
  # harness's accuracy then equals our evaluator's, shown side by side in the report).
  config.evaluate.lm_eval = ml_collections.ConfigDict(dict(
      tasks="",  # comma-separated harness tasks or groups: "hellaswag,arc_easy"
      own_tasks="next_line",  # comma-separated evaluate.tasks names
      include_path="",  # a directory of extra task YAMLs
      num_fewshot=ml_collections.config_dict.placeholder(int),  # None: each task's own
      limit=0.0))  # examples per task: 0 every one, a count, or a fraction below 1
  # Completed greedily by every model, side by side in the report.
  config.evaluate.prompts = ("class LRUCache:\n    def __init__(self", "    raise ValueError(",
                             "        return self.")
  config.evaluate.max_new_tokens = 64

  config.export_dtype = "float32"
  return config


# The width-only target several ablation sweeps share: the shipped teacher's hidden 128 -> 96,
# 8 -> 4 query heads and MLP 512 -> 256 with every layer kept (443,232 of 1,049,728 parameters).
STDLIB_WIDTH_TARGET = dict(num_layers=4, hidden_size=96, num_attention_heads=4,
                           num_key_value_heads=4, intermediate_size=256)


def sweep_config(arg: str, stages: tuple[str, ...], *, target: dict | None = None,
                 width_only: bool = False, replicate_seeds: tuple[int, ...] = (0,),
                 **distill) -> ml_collections.ConfigDict:
  """The embedded default as the base of one ablation sweep (experiments/sweeps/): its stages,
  prune target and `config.distill` changes. `replicate_seeds` are the data seeds a sweep repeats
  its close comparisons with; `runlocal` in `arg` shrinks the run and keeps only the first."""
  config = base_config()
  config.stages = tuple(stages)
  if target is not None:
    config.prune.target = ml_collections.ConfigDict(target)
  if width_only:  # every layer is kept, so no layer ranking is needed
    config.importance.update(drop_loss=False, block_sizes=(1,))
  config.distill.update(distill)
  # A sweep compares our evaluator's numbers across runs; the harness and completions add nothing.
  config.evaluate.lm_eval.own_tasks = ""
  config.evaluate.prompts = ()
  config.replicate_seeds = tuple(replicate_seeds)
  if "runlocal" in parse_arg(arg):
    runlocal(config)
    config.replicate_seeds = config.replicate_seeds[:1]
  return config


def _scaled(value: int, real: int, tiny: int, multiple: int = 1) -> int:
  """value/real of the real model's size, applied to the tiny model's size (at least 1)."""
  return max(multiple, round(value / real * tiny / multiple) * multiple)


def _scale_target(target: dict, real, tiny) -> dict:
  """A real-model target mapped proportionally onto the tiny stand-in model. Heads scale as
  query groups times heads per group, so the tiny target stays a valid GQA shape."""
  real_groups = target.get("num_key_value_heads", real.num_key_value_heads)
  groups = _scaled(real_groups, real.num_key_value_heads, tiny.num_key_value_heads)
  out = {}
  for key, value in target.items():
    if key == "num_key_value_heads":
      out[key] = groups
    elif key == "num_attention_heads":
      per_group = _scaled(value // real_groups, real.queries_per_group, tiny.queries_per_group)
      out[key] = groups * min(per_group, tiny.queries_per_group)
    else:
      multiple = 8 if key in ("hidden_size", "intermediate_size") else 1
      out[key] = min(_scaled(value, getattr(real, key), getattr(tiny, key), multiple),
                     getattr(tiny, key))
      if key == "num_experts":  # fewer than top-k would route every token to all of them
        out[key] = max(out[key], min(tiny.num_experts_per_tok, tiny.num_experts))
  return out


def use_real_model(config: ml_collections.ConfigDict, preset: str) -> None:
  """Settings shared by the paper-scale configs: a named architecture whose weights must come
  from --config.model.hf_path, its own tokenizer, bf16 compute, a mesh over every device."""
  config.model.preset = preset
  config.model.hf_path = ""
  config.model.overrides = ml_collections.ConfigDict()
  config.model.require_checkpoint = True
  config.model.dtype = "bfloat16"
  config.tokenizer = ""
  config.mesh.update(data=1, fsdp=-1, tensor=1)
  config.data.update(source="tfds", seq_len=4096, batch_size=8)
  config.importance.update(num_samples=1024, batch_size=8, seq_len=4096, drop_loss=False,
                           block_sizes=(1,))
  config.distill.update(dtype="bfloat16", remat="dots", seq_len=4096, log_every=10,
                        eval_every=500, checkpoint_every=500)
  config.distill.optimizer.update(peak_lr=2e-4, end_lr=4.5e-7, warmup_steps=100)
  config.evaluate.tasks = ml_collections.ConfigDict()
  config.evaluate.lm_eval.own_tasks = ""
  config.evaluate.prompts = ("The three primary colors are", "def fibonacci(n):\n")


def runlocal(config: ml_collections.ConfigDict) -> None:
  """Shrinks a run to a CPU smoke test of seconds: every stage runs, on tiny sizes.

  A paper-scale config keeps its stages, search and compression plan, but on a tiny random model
  of the same family (a mixture of experts stays one: `config.tiny`'s experts for the family),
  with every target scaled proportionally.
  """
  if config.model.preset != "tiny":
    from minitron_jax.models import config as config_lib  # only runlocal needs the presets here

    real = config_lib.PRESETS[config.model.preset]()
    tiny = config_lib.tiny(real.family, num_layers=4, hidden_size=64, num_attention_heads=8,
                           num_key_value_heads=4, head_dim=16, intermediate_size=256)
    config.model.update(preset="tiny", hf_path="", require_checkpoint=False, dtype="float32")
    config.model.overrides = ml_collections.ConfigDict(
        {k: getattr(tiny, k) for k in ("family", "num_layers", "hidden_size",
                                       "num_attention_heads", "num_key_value_heads", "head_dim",
                                       "intermediate_size")})
    config.tokenizer = "bytes"
    config.mesh.update(data=-1, fsdp=1, tensor=1, expert=1)
    config.data.source = "stdlib"
    config.prune.target = ml_collections.ConfigDict(
        _scale_target(dict(config.prune.target), real, tiny))
    config.compression = tuple(
        {**stage, "target": _scale_target(dict(stage["target"]), real, tiny)}
        for stage in config.compression)
    space = config.search.space
    for key in ("num_layers", "hidden_size", "num_attention_heads", "num_experts",
                "moe_intermediate_size", "shared_expert_intermediate_size"):
      if space.get(key) and getattr(real, key):  # else the search's own error names the axis
        values = {_scale_target({key: v}, real, tiny)[key] for v in space[key]}
        space[key] = tuple(sorted(values))
    space.budget = round(space.budget / real.num_params() * tiny.num_params())
    if space.get("active_params"):
      space.active_params = round(space.active_params / real.num_active_params()
                                  * tiny.num_active_params())
    if space.get("memory"):
      memory = (space.memory_batch, space.memory_seq_len, space.memory_dtype)
      space.memory = round(space.memory / real.memory_bytes(*memory) * tiny.memory_bytes(*memory))
    space.tolerance = max(space.tolerance, 0.25)
    space.round_to = 8
    config.importance.update(drop_loss=True, block_sizes=(1, 2))
    config.importance.drop_block_sizes = tuple(
        min(n, 2) for n in config.importance.drop_block_sizes)
    config.distill.update(dtype="float32", remat="none")
    config.distill.optimizer.accumulation_steps = 1
    config.evaluate.tasks = ml_collections.ConfigDict(dict(
        next_line=dict(source="stdlib_next_line", num_examples=16, num_choices=4, seed=0,
                       mode="context")))
    # A random tiny model's completions say nothing, and the default run's smoke already checks
    # the harness against our evaluator: the paper smokes run our evaluator alone.
    config.evaluate.lm_eval.own_tasks = ""
    config.evaluate.prompts = ()
  config.eval_batches = 2
  config.data.batch_size, config.data.seq_len = 4, 64
  config.importance.update(num_samples=8, batch_size=4, seq_len=64, drop_loss_batches=1)
  config.distill.update(steps=6, batch_size=4, seq_len=64, log_every=2, eval_every=6,
                        checkpoint_every=3)
  config.search.update(retrain_steps=4, eval_steps=(2, 4), max_candidates=2)
  config.teacher_correction.steps = 4
  config.evaluate.tasks.next_line.num_examples = 16
  config.evaluate.batch_size = 16
  config.evaluate.max_new_tokens = 16
  for stage in config.compression:
    stage["distill_steps"] = min(stage.get("distill_steps") or 6, 6)
