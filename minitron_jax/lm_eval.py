"""lm-evaluation-harness tasks on any model the project loads, from the shell:

  python -m minitron_jax.lm_eval --model_path=PATH --tasks=arc_easy,hellaswag \\
      [--num_fewshot=N] [--limit=N] [--include_path=DIR] [--batch_size=N] [--output_path=F] \\
      [--tokenizer=SPEC] [--max_length=N] [--param_dtype=bfloat16]

PATH: a Hugging Face directory, a .gguf file or a stage's saved model (which needs --tokenizer).
Tasks are the harness's (its datasets download unless already cached; set HF_DATASETS_OFFLINE=1
to refuse) or YAML tasks under --include_path. Prints the harness's table and writes its results
as JSON to --output_path. Exit 2 with one line for a bad path, an unknown task or a bad value.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from minitron_jax.errors import ConfigError

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m minitron_jax.lm_eval",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--model_path", required=True)
  parser.add_argument("--tasks", required=True, help="comma-separated task or group names")
  parser.add_argument("--num_fewshot", type=int, default=None)
  parser.add_argument("--limit", type=float, default=None,
                      help="examples per task (a fraction below 1)")
  parser.add_argument("--include_path", default=None, help="a directory of extra task YAMLs")
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--output_path", default=None, help="a JSON file for the results")
  parser.add_argument("--tokenizer", default=None,
                      help="needed for a saved model: 'bytes', tokenizer.json or a directory")
  parser.add_argument("--max_length", type=int, default=None)
  parser.add_argument("--param_dtype", default=None)
  parser.add_argument("--seed", type=int, default=0)
  return parser


def task_names(tasks: str, index) -> list[str]:
  """The comma-separated names, each a task, group or tag the harness knows (one line if not)."""
  names = [name.strip() for name in tasks.split(",") if name.strip()]
  if not names:
    raise ConfigError(f"--tasks={tasks!r} names no task")
  known = set(index.all_tasks)
  unknown = [name for name in names if name not in known and not pathlib.Path(name).is_file()]
  if unknown:
    raise ConfigError(f"unknown task(s) {unknown}; see `lm_eval ls tasks`, or pass "
                      "--include_path=DIR holding their YAML")
  return names


def task_manager(include_path: str | None):
  """The harness's index of its tasks and those under include_path (it reads every YAML)."""
  from lm_eval.tasks import TaskManager

  return TaskManager(include_path=include_path)


def run(args: argparse.Namespace) -> dict:
  """simple_evaluate with our model: the harness's results dict."""
  try:
    import lm_eval
  except ImportError:
    raise ConfigError("lm-eval is not installed; pip install 'minitron-jax[eval]'") from None
  from minitron_jax.core import distributed
  from minitron_jax.evaluation.lm_eval_backend import MinitronLM

  if args.include_path is not None and not pathlib.Path(args.include_path).is_dir():
    raise ConfigError(f"--include_path={args.include_path!r} is not a directory")
  if args.limit is not None and args.limit <= 0:
    raise ConfigError(f"--limit={args.limit} must be positive")
  # The model first: a bad path is refused before the harness reads its thousands of YAMLs.
  model = MinitronLM(args.model_path, tokenizer=args.tokenizer, batch_size=args.batch_size,
                     max_length=args.max_length, param_dtype=args.param_dtype, seed=args.seed)
  tasks_known = task_manager(args.include_path)
  tasks = task_names(args.tasks, tasks_known)
  limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
  results = lm_eval.simple_evaluate(model=model, tasks=tasks, num_fewshot=args.num_fewshot,
                                    limit=limit, task_manager=tasks_known,
                                    random_seed=args.seed, numpy_random_seed=args.seed,
                                    torch_random_seed=args.seed, fewshot_random_seed=args.seed)
  if args.output_path is not None and distributed.is_primary():
    from minitron_jax.core import atomic

    atomic.write_json(args.output_path, json.loads(json.dumps(results, default=str)))
  return results


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    results = run(args)
  except ConfigError as error:  # a user mistake or a bad input file: no traceback
    print(f"error: {error}", file=sys.stderr)
    return EXIT_CONFIG
  from lm_eval.utils import make_table

  print(make_table(results))
  return 0


if __name__ == "__main__":
  sys.exit(main())
