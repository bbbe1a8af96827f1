"""The package's layering, read from the source with `ast` (nothing is imported, no jax): lower layers never import
higher ones, the library never imports the recipe or entry-point folders, and module-level imports form no cycle.
Also: what installs (setup.py) has no generic top-level `configs` or `launch` package, and every console script
names a `main` in launch/."""

from __future__ import annotations

import ast
import configparser
import functools
import os


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "diffgemma_jax"


def _modules() -> dict[str, str]:
  """{dotted module name: file path} of every module of the package."""
  found = {}
  for root, _, files in os.walk(os.path.join(REPO, PACKAGE)):
    for name in files:
      if name.endswith(".py"):
        rel = os.path.relpath(os.path.join(root, name), REPO)[:-3].replace(os.sep, ".")
        found[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(root, name)
  return found


MODULES = _modules()


@functools.lru_cache(maxsize=None)
def _imports(path: str, *, module_level_only: bool) -> tuple[str, ...]:
  """The absolute names `path` imports (for `from a import b`: a, and a.b when that is a module of the package)."""
  tree = ast.parse(open(path, encoding="utf-8").read(), path)
  nodes = tree.body if module_level_only else list(ast.walk(tree))
  names: list[str] = []
  for node in nodes:
    if isinstance(node, ast.Import):
      names += [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      names.append(node.module)
      names += [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES]
  return tuple(names)


def _violations(layer: str, forbidden: tuple[str, ...]) -> set[tuple[str, str]]:
  """(module, imported) for every import (module level or in a function) of `forbidden` by `layer`'s modules."""
  return {(module, name) for module, path in MODULES.items() if module == layer or module.startswith(layer + ".")
          for name in _imports(path, module_level_only=False)
          if any(name == f or name.startswith(f + ".") for f in forbidden)}


def test_data_does_not_import_recipes_or_configs():
  assert _violations(f"{PACKAGE}.data", ("data_recipes", "configs")) == set()


def test_model_does_not_import_parallel_or_train():
  assert _violations(f"{PACKAGE}.model", (f"{PACKAGE}.parallel", f"{PACKAGE}.train")) == set()


def test_the_library_never_imports_configs_or_launch():
  assert _violations(PACKAGE, ("configs", "launch")) == set()


def _import_graph() -> dict[str, set[str]]:
  """Module-level imports between the package's modules. Importing a.b.c first runs the packages a.b and a (their
  `__init__`), so those count too, except the importer's own packages (already being imported)."""
  graph = {}
  for module, path in MODULES.items():
    own = {module.rsplit(".", i)[0] for i in range(module.count(".") + 1)}
    edges = set()
    for name in _imports(path, module_level_only=True):
      parts = name.split(".")
      for i in range(1, len(parts) + 1):
        target = ".".join(parts[:i])
        if target in MODULES and target not in own and target != PACKAGE:
          edges.add(target)
    graph[module] = edges
  return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on_stack.add(v)
    for w in graph[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return found


def test_no_module_level_import_cycles():
  assert _cycles(_import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_nothing_installs_as_a_generic_configs_or_launch_package():
  setup_py = open(os.path.join(REPO, "setup.py"), encoding="utf-8").read()
  library = next(ast.literal_eval(node.value) for node in ast.parse(setup_py).body
                 if isinstance(node, ast.Assign) and node.targets[0].id == "LIBRARY")
  assert not {"configs", "launch"} & set(library)
  parser = configparser.ConfigParser()
  parser.read(os.path.join(REPO, "setup.cfg"))
  assert "options.packages.find" not in parser and "packages" not in parser["options"]  # setup.py decides
  scripts = [line.split("=") for line in parser["options.entry_points"]["console_scripts"].strip().splitlines()]
  for name, target in scripts:
    module, function = target.strip().split(":")
    assert module.startswith(f"{PACKAGE}._launch."), name
    source = os.path.join(REPO, "launch", module.rsplit(".", 1)[1] + ".py")
    assert function in {n.name for n in ast.parse(open(source, encoding="utf-8").read()).body
                        if isinstance(n, ast.FunctionDef)}, name
