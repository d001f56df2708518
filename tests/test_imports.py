"""The library's layer contract, read from every import statement (function-level ones included):
no import cycle, and no module imports a layer above its own.

  tools    entry points and programs over whole runs: sweeps, memory plans, scaling, the shell
  run      the main job: settings, stages, validation, pipeline, report
  library  everything else: models, checkpoints, data, losses, compression, distillation

A new module is library unless listed below; errors.py imports nothing of the package.
"""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "minitron_jax"
TOOLS = {"sweep", "sweep_report", "memory_plan", "scaling", "benchmark", "lm_eval"}
RUN = {"main", "pipeline", "stages", "stage_context", "validate", "run_config", "report",
       "report_curves", "evaluate_stage", "teacher_logits", "search_score", "task_config",
       "check", "workdir_lock"}


def _layer(module: str) -> int:
  return 2 if module in TOOLS else 1 if module in RUN else 0


def _graph() -> dict[str, set[str]]:
  """module -> the package's modules it imports, anywhere in its source."""
  modules = {path.stem for path in PACKAGE.glob("*.py")} - {"__init__"}
  graph = {}
  for module in modules:
    imported = set()
    for node in ast.walk(ast.parse((PACKAGE / f"{module}.py").read_text())):
      if isinstance(node, ast.ImportFrom) and node.module == "minitron_jax":
        imported |= {alias.name for alias in node.names}
      elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("minitron_jax."):
        imported.add(node.module.split(".")[1])
      elif isinstance(node, ast.Import):
        imported |= {alias.name.split(".")[1] for alias in node.names
                     if alias.name.startswith("minitron_jax.")}
    graph[module] = (imported & modules) - {module}
  return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(node):
    index[node] = low[node] = len(index)
    stack.append(node)
    on_stack.add(node)
    for other in graph[node]:
      if other not in index:
        visit(other)
        low[node] = min(low[node], low[other])
      elif other in on_stack:
        low[node] = min(low[node], index[other])
    if low[node] == index[node]:
      component = []
      while True:
        other = stack.pop()
        on_stack.discard(other)
        component.append(other)
        if other == node:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for node in sorted(graph):
    if node not in index:
      visit(node)
  return found


def test_no_import_cycle():
  assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_cycle():  # the check above is not vacuous
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_a_layer_above_its_own():
  graph = _graph()
  assert TOOLS | RUN <= set(graph), sorted((TOOLS | RUN) - set(graph))  # no stale names
  upward = sorted(f"{module} -> {other}" for module, imported in graph.items()
                  for other in imported if _layer(other) > _layer(module))
  assert upward == []


def test_errors_is_a_leaf():
  assert _graph()["errors"] == set()
