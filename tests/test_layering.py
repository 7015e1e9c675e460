"""Who may import whom inside zoo: every import of a zoo module goes down the order below.

The graph is read from each module's source with `ast`, so an import inside a function counts
as much as one at the top: a lower module that imports a higher one "only when needed" still
ties the two into a cycle. Every module of the package must also import on its own.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pkgutil

import pytest

import zoo

# Bottom to top. A node is a package, or a single module where the modules of one package sit
# at different heights (zoo.models: its config and presets sit below the layers, the model
# above them); a module belongs to the longest node that names it or a package above it. A
# module may import modules of its own node, or of nodes earlier in this list, never later.
# Nodes on one line share a level; where two of them need each other, the earlier one is the
# lower, and it imports nothing of the later one.
LAYERS = [
  # zoo.gcs: the Cloud Storage clients' timeouts and retries (zoo.paths names it by path only).
  ["zoo.errors", "zoo.gcs", "zoo.paths", "zoo.io"],
  ["zoo.sharding", "zoo.models.config", "zoo.models.presets"],
  # Linear layers call the CPU kernel; the kernel knows nothing of layers.
  ["zoo.kernels", "zoo.layers"],
  ["zoo.models"],
  # Data knows nothing of checkpoints. The converters use data (the tokenizer and the chat
  # template that a GGUF file carries); LoRA uses the converters (peft's adapter files).
  ["zoo.data", "zoo.convert", "zoo.lora"],
  # Evaluation and training share the loss of zoo.models.loss; the train loop samples its
  # model's text with zoo.infer's Generator, and inference imports nothing of zoo.train.
  ["zoo.infer", "zoo.train"],
  # zoo.plan compiles what zoo.train.setup builds, for TPU slices. zoo.harness (the
  # lm-evaluation-harness backend) loads models through the `zoo` facade.
  ["zoo.distributed", "zoo.launch", "zoo.plan", "zoo", "zoo.harness", "zoo.cli"],
]
RANK = {node: i for i, node in enumerate(n for level in LAYERS for n in level)}


def _modules() -> dict[str, tuple[str, bool]]:
  """{module name: (source path, is a package)} of every module of zoo."""
  out = {"zoo": (zoo.__file__, True)}
  for info in pkgutil.walk_packages(zoo.__path__, "zoo."):
    out[info.name] = (importlib.util.find_spec(info.name).origin, info.ispkg)
  return out


MODULES = _modules()


def node_of(module: str) -> str | None:
  if module == "zoo":
    return "zoo"
  parts = module.split(".")
  for i in range(len(parts), 1, -1):
    if ".".join(parts[:i]) in RANK:
      return ".".join(parts[:i])
  return None


class Import:
  """One imported zoo module: `target`, the names taken from it, where, and the statement."""

  def __init__(self, target: str, names: list[str], line: int, in_function: bool, text: str):
    self.target, self.names, self.line, self.in_function = target, names, line, in_function
    self.text = text

  def __str__(self):
    return f"line {self.line}: {self.text}"


def zoo_imports(module: str) -> list[Import]:
  path, is_pkg = MODULES[module]
  with open(path, encoding="utf-8") as f:
    return parse_imports(f.read(), module, is_pkg)


def parse_imports(source: str, module: str, is_pkg: bool) -> list[Import]:
  """Every import of a zoo module in `source` (of `module`), relative ones resolved; `from P
  import name` counts as an import of P.name where that is a module."""
  tree = ast.parse(source)
  package = module if is_pkg else module.rpartition(".")[0]
  out = []

  def visit(node, in_function):
    for child in ast.iter_child_nodes(node):
      inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                ast.Lambda))
      if isinstance(child, ast.Import):
        out.extend(Import(a.name, [], child.lineno, in_function, ast.unparse(child))
                   for a in child.names if a.name == "zoo" or a.name.startswith("zoo."))
      elif isinstance(child, ast.ImportFrom):
        base = child.module or ""
        if child.level:
          parent = package.rsplit(".", child.level - 1)[0] if child.level > 1 else package
          base = f"{parent}.{base}" if base else parent
        if base == "zoo" or base.startswith("zoo."):
          names = [a.name for a in child.names]
          submodules = [n for n in names if f"{base}.{n}" in MODULES]
          text = ast.unparse(child)
          out.extend(Import(f"{base}.{n}", [], child.lineno, in_function, text)
                     for n in submodules)
          rest = [n for n in names if n not in submodules]
          if rest or not submodules:
            out.append(Import(base, rest, child.lineno, in_function, text))
      visit(child, inner)

  visit(tree, False)
  return out


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_imports(module):
  importlib.import_module(module)


def test_every_module_has_a_layer():
  missing = [m for m in MODULES if node_of(m) is None]
  assert not missing, f"modules without a place in LAYERS: {missing}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down(module):
  """(b) every import goes to the module's own node or a lower one; (c) no private name of
  another module; zoo modules are imported at the top, not inside functions."""
  node = node_of(module)
  problems = []
  for imp in zoo_imports(module):
    target = node_of(imp.target)
    if target is None:
      problems.append(f"{imp}: {imp.target} has no place in LAYERS")
    elif target != node and RANK[target] > RANK[node]:
      problems.append(f"{imp}: {node} imports {target}, which is above it")
    private = [n for n in imp.names if n.startswith("_") and not n.startswith("__")]
    if private and imp.target != module:
      problems.append(f"{imp}: private name(s) {', '.join(private)} of another module")
    if imp.in_function:
      problems.append(f"{imp}: inside a function (zoo modules are imported at the top)")
  assert not problems, f"{module} ({MODULES[module][0]}):\n  " + "\n  ".join(problems)


def test_no_cycle_between_nodes():
  """(a) the graph of nodes has no cycle (shown with the imports that close it)."""
  edges: dict[str, dict[str, list[str]]] = {}
  for module in MODULES:
    src = node_of(module)
    for imp in zoo_imports(module):
      dst = node_of(imp.target)
      if src and dst and dst != src:
        edges.setdefault(src, {}).setdefault(dst, []).append(f"{module} {imp}")
  # Tarjan's strongly connected components; any with two or more nodes is a cycle.
  index, low, stack, on_stack, cycles = {}, {}, [], set(), []

  def strongconnect(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in edges.get(v, {}):
      if w not in index:
        strongconnect(w)
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
        cycles.append(sorted(component))

  for v in list(edges):
    if v not in index:
      strongconnect(v)
  lines = []
  for component in cycles:
    lines.append("cycle among " + ", ".join(component) + ":")
    lines += [f"  {src} -> {dst}{' (upward)' if RANK[dst] > RANK[src] else ''}: {where}"
              for src in component for dst, wheres in edges.get(src, {}).items()
              if dst in component for where in wheres]
  assert not cycles, "\n".join(lines)


def test_the_checker_sees_what_it_must():
  """The checker itself: relative and function-level imports, private names, submodules."""
  source = ("from .tensors import _hidden, read\n"
            "import numpy\n"
            "def f():\n"
            "  from zoo.infer import generate\n"
            "  from .. import lora\n")
  found = parse_imports(source, "zoo.convert.probe", False)
  assert [(i.target, i.names, i.in_function) for i in found] == [
    ("zoo.convert.tensors", ["_hidden", "read"], False), ("zoo.infer.generate", [], True),
    ("zoo.lora", [], True)]
