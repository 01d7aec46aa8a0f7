"""The import graph of `mpxla/`, read from the source: no cycles, and the packages' layering.

Layering (README "Layout"): formats <- quant <- {optim, attention, parallel} <- nn <- models
<- train, and data alone. A package may import only from packages to its left; optim,
attention and parallel do not import each other; data imports no other mpxla package and
only train imports it. Imports inside functions count as much as those at the top.

Edges are module to module: `from mpxla.nn import flow` is an edge to `mpxla.nn.flow`, `from
mpxla import quant` (or `from mpxla.quant import amax`) to the package `mpxla.quant` (its
`__init__`). A module's own parent packages, which Python imports on the way, are not
edges (otherwise every package `__init__` would form a cycle with its modules).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "mpxla"

# Package -> the mpxla packages it may import ('' is mpxla/__init__.py).
_BASE = {"formats": set(), "quant": {"formats"}}
_BASE["optim"] = _BASE["attention"] = _BASE["parallel"] = {"formats", "quant"}
_BASE["nn"] = {"formats", "quant", "optim", "attention", "parallel"}
_BASE["models"] = _BASE["nn"] | {"nn"}
_BASE["train"] = _BASE["models"] | {"models", "data"}
_BASE["data"] = set()
_BASE[""] = set()
ALLOWED = _BASE


def _modules() -> dict[str, pathlib.Path]:
  """{dotted module name: file} for every .py file under mpxla/."""
  out = {}
  for path in sorted(ROOT.rglob("*.py")):
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = path
  return out


def _is_package(path: pathlib.Path) -> bool:
  return path.name == "__init__.py"


def _imports(name: str, path: pathlib.Path, modules) -> set[str]:
  """The mpxla modules `name` imports anywhere in its source."""
  tree = ast.parse(path.read_text(), filename=str(path))
  package = name if _is_package(path) else name.rpartition(".")[0]
  found = set()

  def resolve(dotted: str) -> str | None:
    # The longest prefix that is a module of mpxla (a name imported from a module is no module).
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
      candidate = ".".join(parts[:n])
      if candidate in modules:
        return candidate
    return None

  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = package.split(".")
        base = base[:len(base) - (node.level - 1)]
        mod = ".".join(base + ([node.module] if node.module else []))
      else:
        mod = node.module or ""
      targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
    else:
      continue
    for t in targets:
      if t == "mpxla" or t.startswith("mpxla."):
        m = resolve(t)
        if m is not None and m != name:
          found.add(m)
  return found


def import_graph() -> dict[str, set[str]]:
  modules = _modules()
  return {name: _imports(name, path, modules) for name, path in modules.items()}


def _package(module: str) -> str:
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else ""


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components with more than one module (Tarjan), sorted."""
  index, low, on_stack, stack, out = {}, {}, set(), [], []
  counter = [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return sorted(out)


def test_graph_sees_imports_inside_functions():
  graph = import_graph()
  assert "mpxla.nn.batch_norm" in graph["mpxla.models.cnn"]  # imported inside a function
  assert "mpxla.quant.granularity" in graph["mpxla.quant.qtensor"]


def test_no_import_cycles():
  cycles = _cycles(import_graph())
  assert not cycles, "modules that import each other (directly or through a chain):\n" + "\n".join(
      " <-> ".join(c) for c in cycles)


def test_layering():
  bad = []
  for src, targets in sorted(import_graph().items()):
    p = _package(src)
    for dst in sorted(targets):
      q = _package(dst)
      if q != p and q not in ALLOWED[p]:
        bad.append(f"{src} -> {dst}")
  assert not bad, ("imports against the layering formats <- quant <- {optim, attention, "
                   "parallel} <- nn <- models <- train (data alone):\n" + "\n".join(bad))


@pytest.mark.parametrize("package", sorted(p for p in ALLOWED if p))
def test_every_package_is_placed(package):
  assert (ROOT / package / "__init__.py").exists()


def test_every_package_is_in_the_layering():
  packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
  assert packages == set(ALLOWED) - {""}
