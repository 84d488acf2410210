"""The product packages (qwen_operator, qwen_trainer) import nothing from tools/: the harness, the kind tooling
and the demo may use the product, never the other way round. Imports are read with ast from every module of
both packages, function-local ones and importlib calls included; the names under tools/ are found, not listed."""

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
