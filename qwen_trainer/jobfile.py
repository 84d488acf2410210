"""Read the job spec file a trainer pod is given.

Accepted shapes (YAML or JSON):
- the job spec itself: `{stage: ..., model: ..., training: ..., ...}`;
- a whole QwenTrainingJob resource (`apiVersion`, `kind`, `metadata`, `spec`), whose `spec` holds the job spec
  plus Kubernetes placement fields (image, resources, volumes, ...), which are ignored here;
- the operator's resolved form `{spec: ..., derived: ..., worldSize: N}`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import yaml

from qwen_trainer.errors import UserError, UserErrors
from qwen_trainer.spec import JobSpec, SpecError, load_job_spec
from qwen_trainer.spec.job import JobSpec as _JobSpec

JOB_SPEC_FIELDS = frozenset(f.alias or name for name, f in _JobSpec.model_fields.items()) | frozenset(_JobSpec.model_fields)


@dataclass(frozen=True)
class JobFile:
    spec: JobSpec
    prefix: str  # "spec" when the job spec was nested, "" otherwise (used in messages)
    declared_world_size: Optional[int]
    raw: dict


def read_yaml(path: str) -> Any:
    if not os.path.isfile(path):
        raise UserError(f"spec file {path} does not exist", path="--spec")
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"{path} is not valid YAML{where}: {problem}", path="--spec") from None


def extract(doc: Any) -> tuple[dict, str, Optional[int]]:
    """(job-spec mapping, field prefix, world size declared in the document)."""
    if not isinstance(doc, dict):
        raise UserError(f"expected a mapping at the top of the spec file, got {type(doc).__name__}", path="--spec")
    declared = None
    if isinstance(doc.get("spec"), dict):
        declared = doc.get("worldSize")
        inner = doc["spec"]
        job = {k: v for k, v in inner.items() if k in JOB_SPEC_FIELDS}
        return job, "spec", declared if isinstance(declared, int) else None
    return doc, "", None


def load(path: str, world_size: Optional[int]) -> JobFile:
    doc = read_yaml(path)
    job, prefix, declared = extract(doc)
    if declared is not None and world_size is not None and declared != world_size:
        raise UserError(
            f"the spec was resolved for {declared} processes but this job has {world_size} "
            "(WORLD_SIZE from torchrun); the pod count or processes per pod differ from the spec",
            path="worldSize",
        )
    try:
        spec = load_job_spec(job, world_size, prefix)
    except SpecError as err:
        raise UserErrors([str(p) for p in err.problems]) from None
    return JobFile(spec, prefix, declared, doc)
