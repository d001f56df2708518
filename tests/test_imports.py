"""The library's layer contract, read from every import statement (function-level ones included):
no import cycle between modules or between subpackages, and no subpackage imports one above it.

Layers, lowest first (a package may import those to its left):
  errors < families < core < models < checkpoints < inputs < objectives < compress < training
  < evaluation < run < tools < the command lines (main.py, lm_eval.py)
"""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "minitron_jax"
LAYERS = ("errors", "families", "core", "models", "checkpoints", "inputs", "objectives",
          "compress", "training", "evaluation", "run", "tools", "main", "lm_eval")


def _modules() -> dict[str, pathlib.Path]:
  """Dotted name below minitron_jax (e.g. "models.attention", or "families" for a subpackage's
  __init__, which may import too) -> its file."""
  return {".".join(path.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__"):
          path for path in PACKAGE.rglob("*.py") if path.parent != PACKAGE
          or path.name != "__init__.py"}


def _graph() -> dict[str, set[str]]:
  """module -> the package's modules it imports, anywhere in its source."""
  modules = _modules()
  by_name = {name.rsplit(".", 1)[-1]: name for name in modules}  # `from minitron_jax import x`
  graph = {}
  for name, path in modules.items():
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("minitron_jax"):
        base = node.module.removeprefix("minitron_jax").lstrip(".")
        for alias in node.names:
          full = f"{base}.{alias.name}" if base else alias.name
          if full in modules:
            imported.add(full)
          elif base in modules:
            imported.add(base)
          elif not base and alias.name in by_name:  # the package's lazy module names
            imported.add(by_name[alias.name])
      elif isinstance(node, ast.Import):
        for alias in node.names:
          base = alias.name.removeprefix("minitron_jax.")
          if alias.name.startswith("minitron_jax.") and base in modules:
            imported.add(base)
    graph[name] = imported - {name}
  return graph


def _layer(module: str) -> int:
  return LAYERS.index(module.split(".")[0])


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components with more than one node (Tarjan)."""
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


def test_every_module_is_in_a_layer():
  assert sorted(m for m in _modules() if m.split(".")[0] not in LAYERS) == []


def test_no_import_cycle_between_modules():
  assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_cycle():  # the checks here are not vacuous
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_a_layer_above_its_own():
  upward = sorted(f"{module} -> {other}" for module, imported in _graph().items()
                  for other in imported if _layer(other) > _layer(module))
  assert upward == []


def test_errors_is_a_leaf():
  assert _graph()["errors"] == set()


def _stage_modules() -> set[str]:
  from minitron_jax.run import registry

  return {f"run.stages.{name}" for name in registry.NAMES}


def test_every_registered_stage_is_one_module_with_a_run_and_nothing_else_is():
  import inspect

  from minitron_jax.run import registry, stages

  files = {f"run.stages.{path.stem}" for path in (PACKAGE / "run" / "stages").glob("*.py")
           if path.stem != "__init__"}
  assert files == _stage_modules()
  for name in registry.NAMES:
    assert list(inspect.signature(stages.runner(name)).parameters) == ["ctx", "out"], name


def test_no_stage_imports_another():
  graph = _graph()
  modules = _stage_modules()
  assert modules <= set(graph)
  assert sorted(f"{m} -> {o}" for m in modules for o in graph[m] & modules) == []


def test_stage_outputs_are_named_only_in_the_registry():
  import re

  from minitron_jax.run import registry

  joined = re.compile(r'/ "(' + "|".join(registry.NAMES) + r')"')
  found = sorted(f"{name}: {match.group(0)}" for name, path in _modules().items()
                 if name != "run.registry" for match in joined.finditer(path.read_text()))
  assert found == []
