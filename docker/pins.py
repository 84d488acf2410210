"""Pinned requirements for the image builds, read from pyproject.toml (the one place versions live).

    python docker/pins.py requirements EXTRA[,EXTRA...] [--exclude NAME ...]   pinned lines of those extras
    python docker/pins.py constraints BASE_FILE REQUIREMENTS_FILE              BASE without the names we pin

`constraints` exists for the NGC base image, whose /etc/pip/constraint.txt pins every package the image was
built with: we keep those pins (torch, numpy, ...), except for the packages this project pins itself.
Standard library only: it runs in the build stages before anything is installed.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def name_of(requirement: str) -> str:
    m = _NAME.match(requirement)
    if not m:
        raise ValueError(f"not a requirement: {requirement!r}")
    return canonical(m.group(1))


def extras(pyproject: Path = PYPROJECT) -> dict[str, list[str]]:
    project = tomllib.loads(pyproject.read_text())["project"]
    out = {"base": list(project.get("dependencies", []))}
    out.update(project.get("optional-dependencies", {}))
    return out


def requirements(names: list[str], exclude: list[str], pyproject: Path = PYPROJECT) -> list[str]:
    table = extras(pyproject)
    skip = {canonical(n) for n in exclude}
    lines: list[str] = []
    for extra in names:
        if extra not in table:
            raise SystemExit(f"pins: no extra {extra!r} in {pyproject} (have: {', '.join(sorted(table))})")
        for req in table[extra]:
            if "==" not in req:
                raise SystemExit(f"pins: {req!r} in [{extra}] is not pinned with ==")
            if name_of(req) not in skip and req not in lines:
                lines.append(req)
    return lines


def constraints(base: str, ours: list[str]) -> str:
    pinned = {name_of(r) for r in ours if r.strip() and not r.lstrip().startswith("#")}
    kept = [line for line in base.splitlines()
            if not line.strip() or line.lstrip().startswith("#") or name_of(line) not in pinned]
    return "\n".join(kept) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pins")
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("requirements")
    r.add_argument("extras")
    r.add_argument("--exclude", nargs="*", default=[])
    c = sub.add_parser("constraints")
    c.add_argument("base")
    c.add_argument("requirements")
    args = ap.parse_args(argv)
    if args.command == "requirements":
        print("\n".join(requirements(args.extras.split(","), args.exclude)))
    else:
        base = Path(args.base).read_text() if Path(args.base).exists() else ""
        sys.stdout.write(constraints(base, Path(args.requirements).read_text().splitlines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
