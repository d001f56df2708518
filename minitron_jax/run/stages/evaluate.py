"""The `evaluate` stage: every model the run produced (teacher, pruned, distilled), scored the
same way on the mesh, side by side.

Three kinds of evidence, each in workdir/evaluate and in the report:
  our evaluator    `evaluate.tasks` (the embedded stdlib next-line task, JSONL or TFDS
                   multiple-choice files) and perplexity on the validation batches: table.md;
  the harness      `evaluate.lm_eval`: lm-evaluation-harness tasks through our backend, and our
                   own tasks named in `own_tasks` written as harness tasks (workdir/lm_eval_tasks,
                   reusable with `python -m minitron_jax.lm_eval --include_path=...`), whose
                   accuracy then equals our evaluator's: lm_eval.md;
  completions      the same `evaluate.prompts` completed greedily by every model:
                   completions.md.
"""

from __future__ import annotations

import pathlib
from typing import Mapping

import jax
from minitron_jax.checkpoints import checkpoint
from minitron_jax.core import atomic, distributed
from minitron_jax.evaluation import evaluate, lm_eval_tasks
from minitron_jax.models import generate, partitioning
from minitron_jax.run import registry, stage_context, task_config
from minitron_jax.run.task_config import check_tasks, load_tasks
from minitron_jax.errors import ConfigError
from minitron_jax.run.stage_context import Context



# ----------------------------------------------------------------------------- the harness


def harness_names(section: task_config.EvaluateSettings) -> tuple[list[str], list[str]]:
  """(harness task names, own task names) of `evaluate.lm_eval`."""
  harness = section.lm_eval
  return (lm_eval_tasks.split_names(harness.tasks, "evaluate.lm_eval.tasks"),
          lm_eval_tasks.split_names(harness.own_tasks, "evaluate.lm_eval.own_tasks"))


def check_lm_eval(section: task_config.EvaluateSettings, *, index: bool = True) -> list[str]:
  """One line per problem of `evaluate.lm_eval`; `index` also looks every task name up (which
  reads the harness's task YAMLs: some 13 s unless every task is local)."""
  harness = section.lm_eval
  try:
    names, own = harness_names(section)
  except ConfigError as e:
    return [f"evaluate.lm_eval: {e}"]
  problems = []
  unknown = [name for name in own if name not in section.tasks]
  if unknown:
    problems.append(f"evaluate.lm_eval.own_tasks: {unknown} are not evaluate.tasks entries; "
                    f"allowed: {sorted(section.tasks)}")
  clash = sorted(set(names) & set(own))
  if clash:
    problems.append(f"evaluate.lm_eval.tasks: {clash} are also own_tasks; name each once")
  if harness.include_path and not pathlib.Path(harness.include_path).is_dir():
    problems.append(f"evaluate.lm_eval.include_path: {harness.include_path!r} is not a directory")
  fewshot = harness.num_fewshot
  if fewshot is not None and (not isinstance(fewshot, int) or fewshot < 0):
    problems.append(f"evaluate.lm_eval.num_fewshot: {fewshot!r} must be None (each task's own) "
                    "or an integer >= 0")
  if not isinstance(harness.limit, (int, float)) or harness.limit < 0:
    problems.append(f"evaluate.lm_eval.limit: {harness.limit!r} must be 0 (every example), a "
                    "count or a fraction below 1")
  if names and index and not problems:
    try:
      lm_eval_tasks.task_manager(harness.include_path or None, names)
    except ConfigError as e:
      problems.append(f"evaluate.lm_eval.tasks: {e}")
  return problems


# ----------------------------------------------------------------------------- completions


def check_prompts(section: task_config.EvaluateSettings) -> list[str]:
  prompts, new = section.prompts, section.max_new_tokens
  problems = []
  if isinstance(prompts, str) or not all(isinstance(p, str) and p for p in prompts):
    problems.append(f"evaluate.prompts: {prompts!r} must be a tuple of non-empty strings")
  if not isinstance(new, int) or new < 1:
    problems.append(f"evaluate.max_new_tokens: {new!r} must be a positive integer")
  return problems


def completions_markdown(prompts, completions: Mapping[str, list[str]]) -> str:
  """Each prompt once, then every model's greedy completion of it, in fenced blocks."""
  lines = []
  for i, prompt in enumerate(prompts):
    lines += [f"**Prompt {i + 1}**", "", _fenced(prompt), ""]
    for label, texts in completions.items():
      lines += [f"*{label}*", "", _fenced(prompt + texts[i]), ""]
  return "\n".join(lines)


def _fenced(text: str) -> str:
  fence = "```"
  while fence in text:  # a completion holding a fence would close ours
    fence += "`"
  return f"{fence}\n{text.rstrip()}\n{fence}"


# ----------------------------------------------------------------------------- the stage


def check(plan: stage_context.Plan) -> list[str]:
  """This stage's problems for validation, one line each ("setting: message")."""
  section = plan.settings_of("evaluate")
  if section is None:  # its problem is noted already
    return []
  return check_tasks(section.tasks) + check_prompts(section) + check_lm_eval(section)


def run(ctx: Context, out: registry.Outputs) -> dict:
  section: task_config.EvaluateSettings = ctx.settings
  plan, mesh = ctx.plan, ctx.mesh
  tasks = load_tasks(section.tasks)
  names, own = harness_names(section)
  manager = (task_config.harness_index(section.lm_eval, names, {name: tasks[name] for name in own},
                                       out.work("harness_tasks")) if names or own else None)
  place = lambda x: distributed.put(x, partitioning.batch_sharding(mesh, x.shape))  # noqa: E731
  results, completions = {}, {}
  for label, ref in plan.models().items():
    if ref.path is not None and not checkpoint.is_saved_model(ref.path):
      continue
    config, params = ctx.load(ref)
    tok = plan.load_tokenizer(config.vocab_size)
    # On the mesh, params where training put them: no device holds the whole model.
    metrics = evaluate.evaluate_model(
        config, params, tok, tasks=tasks,
        perplexity_batches=plan.validation(config.vocab_size),
        batch_size=section.batch_size, max_length=section.max_length, place=place)
    if manager is not None:
      scores = lm_eval_tasks.evaluate(
          config, params, tok, names + own, num_fewshot=section.lm_eval.num_fewshot,
          limit=task_config.limit_of(section.lm_eval.limit), batch_size=section.batch_size,
          max_length=section.max_length, mesh=mesh, manager=manager)
      metrics.update({f"lm_eval/{key}": value for key, value in scores.items()})
    results[label] = {"params": config.num_params(), **metrics}
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
    ctx.log(f"[evaluate] {label}: {shown}")
    if section.prompts:
      with jax.set_mesh(mesh):
        completions[label] = generate.generate_text(config, params, tok, list(section.prompts),
                                                    max_new_tokens=section.max_new_tokens)
  if not results:
    raise ConfigError("no model to evaluate")
  ours = [k for k in dict.fromkeys(k for m in results.values() for k in m)
          if not k.startswith("lm_eval/")]
  harness = [k for k in dict.fromkeys(k for m in results.values() for k in m)
             if k.startswith("lm_eval/")]
  atomic.write_text(out.staged("table"), evaluate.markdown_table(results, ours))
  if harness:
    fewshot = section.lm_eval.num_fewshot
    shots = "each task's own" if fewshot is None else fewshot
    header = (f"lm-evaluation-harness {lm_eval_version()} through our backend; num_fewshot="
              f"{shots}, limit={task_config.limit_of(section.lm_eval.limit) or 'none'}.\n\n")
    table = evaluate.markdown_table(
        results, harness, header_names={k: k.removeprefix("lm_eval/") for k in harness})
    atomic.write_text(out.staged("lm_eval"), header + table)
  if completions:
    atomic.write_json(out.staged("completions_json"),
                      dict(prompts=list(section.prompts), completions=completions))
    atomic.write_text(out.staged("completions"),
                      completions_markdown(section.prompts, completions))
  atomic.write_json(out.staged("metrics"), results)
  return results


def lm_eval_version() -> str:
  from importlib import metadata

  return metadata.version("lm-eval")
