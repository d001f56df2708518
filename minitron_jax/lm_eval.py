"""lm-evaluation-harness tasks on any model the project loads, from the shell:

  python -m minitron_jax.lm_eval --model_path=PATH --tasks=arc_easy,hellaswag \\
      [--num_fewshot=N] [--limit=N] [--include_path=DIR] [--batch_size=N] [--output_path=F] \\
      [--tokenizer=SPEC] [--max_length=N] [--param_dtype=bfloat16]

PATH: a Hugging Face directory, a .gguf file or a stage's saved model (which needs --tokenizer).
Tasks are the harness's, read from the Hugging Face datasets cache (offline: nothing is
downloaded unless HF_DATASETS_OFFLINE=0 and HF_HUB_OFFLINE=0 are set), or YAML tasks under
--include_path. Prints the harness's table and writes its results
as JSON to --output_path. Exit 2 with one line for a bad path, an unknown task or a bad value.
"""

from __future__ import annotations

import argparse
import json
import os
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


def run(args: argparse.Namespace) -> dict:
  """simple_evaluate with our model: the harness's results dict."""
  import lm_eval

  from minitron_jax.core import distributed
  from minitron_jax.evaluation import lm_eval_tasks
  from minitron_jax.evaluation.lm_eval_backend import MinitronLM

  if args.include_path is not None and not pathlib.Path(args.include_path).is_dir():
    raise ConfigError(f"--include_path={args.include_path!r} is not a directory")
  tasks = lm_eval_tasks.split_names(args.tasks, "--tasks")
  if not tasks:
    raise ConfigError(f"--tasks={args.tasks!r} names no task")
  if args.limit is not None and args.limit <= 0:
    raise ConfigError(f"--limit={args.limit} must be positive")
  # The model first: a bad path is refused before the harness reads its thousands of YAMLs.
  model = MinitronLM(args.model_path, tokenizer=args.tokenizer, batch_size=args.batch_size,
                     max_length=args.max_length, param_dtype=args.param_dtype, seed=args.seed)
  # A task may also be a YAML file's path, which the harness reads itself.
  tasks_known = lm_eval_tasks.task_manager(
      args.include_path, [name for name in tasks if not pathlib.Path(name).is_file()],
      include_setting="--include_path")
  limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
  try:
    results = lm_eval.simple_evaluate(model=model, tasks=tasks, num_fewshot=args.num_fewshot,
                                      limit=limit, task_manager=tasks_known,
                                      random_seed=args.seed, numpy_random_seed=args.seed,
                                      torch_random_seed=args.seed, fewshot_random_seed=args.seed)
  except OSError as error:  # the datasets library's "Couldn't reach ... on the Hub", offline
    raise ConfigError(_unavailable(tasks, tasks_known, error)) from None
  if args.output_path is not None and distributed.is_primary():
    from minitron_jax.core import atomic

    atomic.write_json(args.output_path, json.loads(json.dumps(results, default=str)))
  return results


def _unavailable(tasks: list[str], task_manager, error: OSError) -> str:
  """One line for a task whose dataset cannot be read here: which task (each is loaded alone
  until one fails; this runs only on the way out) and what to do."""
  culprit = None
  for name in tasks:
    try:
      task_manager.load([name])
    except OSError:
      culprit = name
      break
  first = (str(error).splitlines() or [type(error).__name__])[0][:200]
  named = f"task {culprit!r}" if culprit else f"one of the tasks {','.join(tasks)}"
  return (f"{named} cannot read its dataset ({first}): with no network, its dataset must be in "
          "the Hugging Face datasets cache already, or the task given with its data under "
          "--include_path")


# Set before the harness imports huggingface_hub and datasets, which read them once.
OFFLINE = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  for name in OFFLINE:  # the project downloads nothing unless told to
    os.environ.setdefault(name, "1")
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
