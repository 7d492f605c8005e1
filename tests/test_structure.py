"""The package's shape (issue #15): no import cycles, small modules, no reaching into other folders' privates.

Every check walks the source of the installed ``ctrflow`` modules (the packages and package-dir of
pyproject.toml) with ``ast``, so it sees imports inside functions too; it imports nothing it checks.
Findings outside ``etl/`` that predate these checks are listed in ``KNOWN_*`` sets, to be emptied; a
new finding, or a listed one that is gone, fails the test (so each set only shrinks).
"""

from __future__ import annotations

import ast
import os
import tomllib
from dataclasses import dataclass, field

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LINES = 400

# ---- known findings outside etl/, to be fixed by the lead (then removed here: a fixed entry fails the test) ----
# Modules over MAX_LINES lines (path relative to the repository root).
KNOWN_LONG: set[str] = set()
# Import cycles, each as the sorted names of the modules it runs through.
KNOWN_CYCLES: set[tuple[str, ...]] = set()
# (importing file, "module.private_name") pairs across folders.
KNOWN_PRIVATE: set[tuple[str, str]] = set()


@dataclass
class Module:
    """One ctrflow module: its dotted name, file, package folder and imports."""

    name: str
    path: str
    is_package: bool
    imports: list[tuple[int, str, str | None]] = field(default_factory=list)  # (line, module, imported name)

    @property
    def folder(self) -> str:
        return os.path.dirname(self.path)

    @property
    def rel(self) -> str:
        return os.path.relpath(self.path, ROOT)


def _package_dirs() -> dict[str, str]:
    """``{package name: folder}`` of every package pyproject.toml installs."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        cfg = tomllib.load(f)["tool"]["setuptools"]
    dirs = cfg.get("package-dir", {})
    return {pkg: os.path.join(ROOT, dirs.get(pkg, pkg.replace(".", os.sep))) for pkg in cfg["packages"]}


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth (functions, methods, try blocks), except under ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node.test):
            for child in node.orelse:  # the else branch runs
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _lazy_names(tree: ast.Module) -> dict[str, str]:
    """A package's lazily exported names: module-level ``{"Name": "ctrflow.x.y", ...}`` dict literals
    (``__getattr__`` imports them on first use, so ``from ctrflow.x import Name`` depends on ``ctrflow.x.y``)."""
    out: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Dict):
            for k, v in zip(node.value.keys, node.value.values, strict=True):
                if (isinstance(k, ast.Constant) and isinstance(k.value, str) and isinstance(v, ast.Constant)
                        and isinstance(v.value, str) and v.value.startswith("ctrflow.")):
                    out[k.value] = v.value
    return out


def load_modules() -> dict[str, Module]:
    """Every module of the installed packages, with its imports of ctrflow modules resolved."""
    modules: dict[str, Module] = {}
    trees: dict[str, ast.Module] = {}
    for pkg, folder in _package_dirs().items():
        for fname in sorted(os.listdir(folder)):
            if not fname.endswith(".py"):
                continue
            is_pkg = fname == "__init__.py"
            name = pkg if is_pkg else f"{pkg}.{fname[:-3]}"
            path = os.path.join(folder, fname)
            with open(path, encoding="utf-8") as f:
                trees[name] = ast.parse(f.read(), path)
            modules[name] = Module(name, path, is_pkg)
    lazy = {name: _lazy_names(trees[name]) for name, m in modules.items() if m.is_package}
    for name, m in modules.items():
        for node in _import_nodes(trees[name]):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in modules:
                        m.imports.append((node.lineno, alias.name, None))
                continue
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                parts = (name if m.is_package else name.rpartition(".")[0]).split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in modules:  # `from ctrflow.etl import ops` (also `from ctrflow import etl`): the submodule
                    m.imports.append((node.lineno, sub, None))
                elif alias.name in lazy.get(base, {}):  # `from ctrflow.etl import Workflow` (lazy export)
                    m.imports.append((node.lineno, lazy[base][alias.name], alias.name))
                elif base in modules:
                    m.imports.append((node.lineno, base, alias.name))
    return modules


def find_cycles(modules: dict[str, Module]) -> dict[tuple[str, ...], list[str]]:
    """``{sorted modules of a cycle: one cycle through them}``: every strongly connected component of
    more than one module (or a module importing itself), found with Tarjan's algorithm."""
    graph = {n: sorted({dep for _, dep, _ in m.imports}) for n, m in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
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
            if len(comp) > 1 or v in graph[v]:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return {tuple(comp): _cycle_in(graph, comp) for comp in comps}


def _cycle_in(graph: dict[str, list[str]], comp: list[str]) -> list[str]:
    """One concrete cycle through the component's first module (breadth-first, so a shortest one)."""
    inside, start = set(comp), comp[0]
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in graph[v]:
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [*reversed(path), start]
                if w in inside and w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return comp  # unreachable for a strongly connected component


@pytest.fixture(scope="module")
def modules() -> dict[str, Module]:
    return load_modules()


def test_every_package_folder_is_found(modules):
    assert "ctrflow.etl.workflow" in modules and "ctrflow.etl.ops.categorify" in modules
    assert {m.name.split(".")[1] for m in modules.values()} >= {"etl", "loader", "models", "train", "serve", "bench"}


def test_no_import_cycle(modules):
    found = find_cycles(modules)
    new = {k: v for k, v in found.items() if k not in KNOWN_CYCLES}
    assert not new, "import cycles (imports inside functions count):\n" + "\n".join(
        f"{' -> '.join(c)}  (all of: {', '.join(k)})" for k, c in new.items())
    assert not KNOWN_CYCLES - set(found), f"fixed, drop from KNOWN_CYCLES: {KNOWN_CYCLES - set(found)}"


def test_no_module_over_the_line_limit(modules):
    long = {}
    for m in modules.values():
        with open(m.path, encoding="utf-8") as f:
            n = sum(1 for _ in f)
        if n > MAX_LINES:
            long[m.rel] = n
    new = {k: v for k, v in long.items() if k not in KNOWN_LONG}
    assert not new, f"modules over {MAX_LINES} lines: {new}"
    assert not KNOWN_LONG - set(long), f"fixed, drop from KNOWN_LONG: {KNOWN_LONG - set(long)}"


def test_no_private_name_imported_from_another_folder(modules):
    found = set()
    for m in modules.values():
        for _, target, name in m.imports:
            if name and name.startswith("_") and not name.startswith("__") and modules[target].folder != m.folder:
                found.add((m.rel, f"{target}.{name}"))
    new = found - KNOWN_PRIVATE
    assert not new, "private names imported from another folder (make them public or move them):\n" + "\n".join(
        f"{f}: {n}" for f, n in sorted(new))
    assert not KNOWN_PRIVATE - found, f"fixed, drop from KNOWN_PRIVATE: {KNOWN_PRIVATE - found}"


def test_the_walker_sees_imports_inside_functions_and_skips_type_checking():
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a\nelse:\n    import b\n"
                     "def f():\n    import c\n    from d import e\n")
    names = [n.names[0].name if isinstance(n, ast.Import) else n.module for n in _import_nodes(tree)]
    assert names == ["typing", "b", "c", "d"]


def test_cycle_finder_reports_a_cycle():
    mods = {n: Module(n, f"/x/{n}.py", False) for n in "abcd"}
    for a, b in [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")]:
        mods[a].imports.append((1, b, None))
    assert find_cycles(mods) == {("a", "b", "c"): ["a", "b", "c", "a"]}
