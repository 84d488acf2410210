"""The job spec: the single source of truth for what a training stage does.

`load_job_spec` validates structure (pydantic) and then the cross-field rules, raising `SpecError` with one
problem per broken rule, each naming its field.
"""

from __future__ import annotations

from typing import Any, Optional

from .job import JobSpec, Stage
from .problems import Problem, SpecError, parse
from .resolve import Derived, ResolvedArchitecture, derive, resolve_architecture
from .rules import check_rules


def semantic_problems(spec: JobSpec, world_size: Optional[int] = None, prefix: str = "",
                      gpus_per_node: Optional[int] = None) -> list[Problem]:
    join = (lambda p: f"{prefix}.{p}") if prefix else (lambda p: p)
    return [Problem(join(path), message) for path, message in check_rules(spec, world_size, gpus_per_node)]


def load_job_spec(data: Any, world_size: Optional[int] = None, prefix: str = "") -> JobSpec:
    spec = parse(JobSpec, data, prefix)
    problems = semantic_problems(spec, world_size, prefix)
    if problems:
        raise SpecError(problems)
    return spec


__all__ = [
    "Derived",
    "JobSpec",
    "Problem",
    "ResolvedArchitecture",
    "SpecError",
    "Stage",
    "derive",
    "load_job_spec",
    "resolve_architecture",
    "semantic_problems",
]
