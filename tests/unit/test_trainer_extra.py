"""The `trainer` extra (what the trainer images install) carries every third-party package that
qwen_trainer imports, lazily imported ones included: a pod without one fails at run time, not at build time
(progress reporting once died in pods for want of `kubernetes`)."""

from __future__ import annotations

import ast
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Optional at run time by design: GPU-only kernels and libraries (the `gpu` extra, or the NGC base image).
GPU_ONLY = {"transformer_engine", "flash_attn", "megablocks", "grouped_gemm", "stk", "apex", "triton", "nvidia"}


def third_party_imports() -> dict[str, str]:
    """Top-level module -> first file importing it, for every import in qwen_trainer/ outside the stdlib."""
    found: dict[str, str] = {}
    for path in sorted((ROOT / "qwen_trainer").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "qwen_trainer":
                    found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def test_trainer_extra_has_every_runtime_import():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["optional-dependencies"]["trainer"] + project.get("dependencies", [])
    declared = {canonical(req.split("==")[0].split("[")[0].split(">")[0].strip()) for req in wanted}
    dists = packages_distributions()
    missing = []
    for module, where in third_party_imports().items():
        if module in GPU_ONLY or module == "qwen_operator":
            continue
        owners = {canonical(d) for d in dists.get(module, [])}
        # Owned by a declared package, or a direct dependency of one (numpy comes with torch).
        if owners and not owners & declared and not any(_requires(d, owners) for d in declared):
            missing.append(f"{module} ({', '.join(sorted(owners))}) imported by {where}")
    assert not missing, "qwen_trainer imports packages the trainer extra does not bring:\n" + "\n".join(missing)


def _requires(dist: str, owners: set[str]) -> bool:
    """Whether `dist` (installed) depends, directly, on one of `owners`."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        reqs = requires(dist) or []
    except PackageNotFoundError:
        return False
    for req in reqs:
        if "extra ==" in req:
            continue
        name = canonical(req.split(";")[0].split("[")[0].split("=")[0].split(">")[0].split("<")[0].split("~")[0]
                         .split("!")[0].strip())
        if name in owners:
            return True
    return False
