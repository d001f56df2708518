"""The `teacher_logits` stage: the teacher's top-k over the distillation stream, stored once
(training/teacher_logits_store.py), so search retraining and distillation read it instead of
running the teacher.

Putting the stage in `config.stages` is the switch: search and distill of that compression stage
then train from `<stage dir>/teacher_logits/train` (rows in the order the online run reads them)
and validate on `<stage dir>/teacher_logits/validation` (the run's fixed validation batches), and
never load the teacher (run/teacher_logits_inputs.py reads and checks the stores).
"""

from __future__ import annotations

import time

from minitron_jax.core import atomic
from minitron_jax.inputs import data
from minitron_jax.models import partitioning
from minitron_jax.run import registry, stage_context
from minitron_jax.run.teacher_logits_inputs import STAGE, StoreSettings, expected_metadata
from minitron_jax.training import teacher_logits_store


def check(plan: stage_context.Plan) -> list[str]:
  """That a stage reads the store (its settings were checked as the plan parsed them)."""
  if not set(plan.stages) & {"distill", "search"}:
    return [f"stages: {STAGE} stores the teacher for distill and search, and neither runs; "
            "allowed: 'distill' or 'search' in stages with it"]
  return []


def run(ctx: stage_context.Context, out: registry.Outputs) -> dict:
  """Writes (or finishes) both stores of this compression stage; its summary marks it done."""
  settings: StoreSettings = ctx.settings
  plan = ctx.plan
  started = time.perf_counter()
  mesh = ctx.mesh
  config, params = ctx.load(ctx.teacher)
  config = config.replace(dtype=settings.compute_dtype)
  tok = plan.load_tokenizer(config.vocab_size)
  shard = lambda shape: partitioning.batch_sharding(mesh, shape)
  summary = {}
  for split in ("train", "validation"):
    meta = expected_metadata(plan, ctx.teacher, config, split, ctx.distill_steps)
    if split == "train":
      batches = data.make_iterator(settings.train, tok, "train")
    else:
      batches = iter(plan.validation(config.vocab_size))
    ctx.log(f"[{STAGE}] {split}: top-{meta.k} of the {ctx.teacher.label} teacher over "
            f"{meta.num_rows} rows of {meta.seq_len} tokens, {meta.bytes_per_token} bytes/token")
    split_started = time.perf_counter()
    written = teacher_logits_store.write(out.work(split), meta, config, params, batches,
                                         batch_size=settings.batch_size,
                                         batch_sharding=shard, log=ctx.log)
    seconds = time.perf_counter() - split_started
    summary[split] = dict(rows=written.num_rows, tokens=written.num_rows * written.seq_len,
                          bytes_per_token=written.bytes_per_token, seconds=seconds,
                          stream_sha256=written.stream_sha256)
  summary.update(k=meta.k, dtype=meta.dtype, seconds=time.perf_counter() - started)
  atomic.write_json(out.staged("summary"), summary)
  ctx.log(f"[{STAGE}] done in {summary['seconds']:.1f}s; stores in {out.final()}")
  return summary
