"""The QwenTrainingJob's group, version and plural are written once (qwen_trainer/spec/resource_name.py); every other
module of the product packages takes them from there (through qwen_operator.api), never retyping them. Tests and
docs spell the wire form out on purpose: they pin it."""

from __future__ import annotations

import re
from pathlib import Path

from qwen_trainer.spec import resource_name

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = (ROOT / "operator" / "qwen_operator", ROOT / "qwen_trainer")
HOME = ROOT / "qwen_trainer" / "spec" / "resource_name.py"


def retyped(text: str) -> list[str]:
    """Source lines (comments and docstrings aside: lines that are not code are skipped) that spell the group or
    the plural in a string literal."""
    words = (re.escape(resource_name.GROUP), re.escape(resource_name.PLURAL))
    literal = re.compile(r"""(["'])[^"'\n]*(?:%s)[^"'\n]*\1""" % "|".join(words))
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        code = line.split("#", 1)[0]
        if code.lstrip().startswith(("*", "`")) or not code.strip():
            continue
        if literal.search(code):
            found.append(f"{number}: {line.strip()}")
    return found


def test_the_check_sees_a_retyped_group_and_plural():
    assert retyped('LABEL = "training.qwen.dev/job"\nx = f"{GROUP}/job"  # training.qwen.dev\n') == \
        ['1: LABEL = "training.qwen.dev/job"']
    assert retyped("api.list('training.qwen.dev', 'v1alpha1', 'qwentrainingjobs')\n")


def test_group_and_plural_are_not_retyped_in_the_product():
    problems = []
    for package in PACKAGES:
        for path in sorted(package.rglob("*.py")):
            if path == HOME or "__pycache__" in path.parts:
                continue
            problems += [f"{path.relative_to(ROOT)}:{hit}" for hit in retyped(path.read_text())]
    assert not problems, "use GROUP / PLURAL from qwen_operator.api (or qwen_trainer.spec.resource_name):\n" + \
        "\n".join(problems)
