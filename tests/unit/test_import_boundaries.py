"""The product packages (qwen_operator, qwen_trainer) import nothing from tools/ (the harness, the kind tooling
and the demo may use the product, never the other way round) and have no import cycles. Imports are read with ast
from every module of both packages, function-local ones and importlib calls included; the names under tools/ are
found, not listed."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / "tools"
PRODUCT = {"qwen_operator": ROOT / "operator" / "qwen_operator", "qwen_trainer": ROOT / "qwen_trainer"}


def tool_modules() -> set[str]:
    """Top-level names importable from tools/: its modules and packages (and `tools` itself)."""
    names = {"tools"}
    for entry in TOOLS.iterdir():
        if entry.suffix == ".py":
            names.add(entry.stem)
        elif entry.is_dir() and (entry / "__init__.py").exists():
            names.add(entry.name)
    return names


def imported_modules(source: str, filename: str = "<source>") -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a module: statements anywhere in it (also inside
    functions and try blocks) and importlib.import_module / __import__ calls with a literal name. Relative
    imports stay inside their package and are left out."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__"):
                found.append((node.lineno, node.args[0].value))
    return found


def tools_imports(source: str, filename: str = "<source>") -> list[tuple[int, str]]:
    tools = tool_modules()
    return [(line, name) for line, name in imported_modules(source, filename) if name.split(".")[0] in tools]


def product_modules(package: str) -> list[Path]:
    return sorted(p for p in PRODUCT[package].rglob("*.py") if "__pycache__" not in p.parts)


def test_tools_names_are_found():
    # Guards the test below against passing vacuously if tools/ moves or changes shape.
    assert {"qwen_devcluster", "qwen_kind", "demo_inputs"} <= tool_modules()


@pytest.mark.parametrize("package", sorted(PRODUCT))
def test_product_package_imports_nothing_from_tools(package):
    modules = product_modules(package)
    assert len(modules) > 10, f"{PRODUCT[package]}: expected the package's modules, found {len(modules)}"
    problems = []
    for path in modules:
        for line, name in tools_imports(path.read_text(), str(path)):
            problems.append(f"{path.relative_to(ROOT)}:{line}: imports {name} (tools/)")
    assert not problems, "\n".join(problems)


def test_the_check_sees_local_conditional_and_dynamic_imports():
    source = '''
import os, qwen_kind.cluster
from qwen_trainer.spec import SpecError
from . import render
from .api import KIND

def cmd():
    try:
        from qwen_devcluster.__main__ import main
    except ImportError:
        pass
    import importlib
    importlib.import_module("demo_inputs")
    __import__("tools.demo")
    print("qwen_devcluster is a word in a string, not an import")
'''
    assert tools_imports(source) == [(2, "qwen_kind.cluster"), (9, "qwen_devcluster.__main__"),
                                     (13, "demo_inputs"), (14, "tools.demo")]


# ------------------------------------------------------------------------------------------ import cycles


def module_names(package: str) -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is a package's __init__) for every module of a product package."""
    names = {}
    for path in product_modules(package):
        parts = (package,) + path.relative_to(PRODUCT[package]).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        names[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return names


def _runtime_nodes(tree: ast.Module) -> list[ast.AST]:
    """Every node of a module except what sits under `if TYPE_CHECKING:` (types only, never imported at run time)."""
    found, stack = [], [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        found.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return found


def import_edges(name: str, path: Path, is_package: bool, known: set[str]) -> set[str]:
    """The product modules `name` imports (anywhere in it, function-local ones included): `from pkg import x` is an
    edge to pkg.x where that is a module, else to pkg (its __init__)."""
    here = name if is_package else name.rpartition(".")[0]
    edges = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            edges |= {alias.name for alias in node.names if alias.name in known}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                if f"{module}.{alias.name}" in known:
                    edges.add(f"{module}.{alias.name}")
                elif module in known:
                    edges.add(module)
    edges.discard(name)
    return edges


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(cycles)


def test_product_packages_have_no_import_cycles():
    """No module of qwen_operator or qwen_trainer reaches itself through imports, not even through a function-local
    import (the usual way a circle is hidden rather than removed)."""
    modules = {name: found for package in sorted(PRODUCT) for name, found in module_names(package).items()}
    assert {"qwen_operator.handlers", "qwen_trainer.convert.api", "qwen_trainer.spec"} <= set(modules)
    graph = {name: import_edges(name, path, is_package, set(modules)) for name, (path, is_package) in modules.items()}
    assert "qwen_trainer.spec.job" in graph["qwen_trainer.spec"]  # the edges are seen at all
    cycles = import_cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_check_sees_local_and_package_imports(tmp_path):
    pkg = tmp_path / "p"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import A\n")
    (pkg / "a.py").write_text("A = 1\ndef f():\n    from p.sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("from typing import TYPE_CHECKING\nfrom .. import c\nif TYPE_CHECKING:\n"
                                      "    from p import a\n")
    (pkg / "c.py").write_text("from p import A\n")
    files = {"p": (pkg / "__init__.py", True), "p.a": (pkg / "a.py", False), "p.sub": (pkg / "sub" / "__init__.py", True),
             "p.sub.b": (pkg / "sub" / "b.py", False), "p.c": (pkg / "c.py", False)}
    graph = {n: import_edges(n, path, is_pkg, set(files)) for n, (path, is_pkg) in files.items()}
    assert graph == {"p": {"p.a"}, "p.a": {"p.sub.b"}, "p.sub": set(), "p.sub.b": {"p.c"}, "p.c": {"p"}}
    assert import_cycles(graph) == [["p", "p.a", "p.c", "p.sub.b"]]
