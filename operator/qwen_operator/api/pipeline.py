"""Multi-stage pipelines in one QwenTrainingJob: convert -> pretrain -> finetune -> export -> evaluate.

`spec.pipeline` lists the stages in order. Each step names its stage and overrides parts of the resource's
spec (training, data, checkpoint, evaluate, parallelism, resources, image); everything else is shared. A
step without `checkpoint.source` reads what the previous step wrote (its `checkpoint.output`, in that
step's output format), so a chain is written once. Each step is validated as a whole single-stage spec,
and problems name the step (`spec.pipeline[1].training.lr`).

Pure functions over the wire form (camelCase dicts).
"""

from __future__ import annotations

import copy
from typing import Any

from qwen_trainer.spec import Problem, SpecError
from qwen_trainer.spec.resolve import checkpoint_formats

from .resource import validate_stage_spec

OVERRIDABLE = ("training", "data", "checkpoint", "evaluate", "parallelism", "resources", "image")


def is_pipeline(spec: dict[str, Any]) -> bool:
    return isinstance(spec, dict) and spec.get("pipeline") is not None


def deep_merge(base: Any, override: Any) -> Any:
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            out[key] = deep_merge(base.get(key), value) if key in base else copy.deepcopy(value)
        return out
    return copy.deepcopy(override)


def pipeline_steps(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any], Any]]:
    """(step name, effective single-stage spec, its validated QwenTrainingJobSpec) for every step, with
    checkpoints wired from one step to the next. SpecError lists every problem of the pipeline and its steps."""
    steps = spec.get("pipeline")
    if not isinstance(steps, list) or not steps:
        raise SpecError([Problem("spec.pipeline", "must list at least one stage")])
    problems: list[Problem] = []
    if spec.get("stage") is not None:
        problems.append(Problem("spec.stage", "set either spec.stage (one stage) or spec.pipeline, not both"))
    base = {k: copy.deepcopy(v) for k, v in spec.items() if k not in ("pipeline", "stage")}
    base_checkpoint = base.get("checkpoint") or {}
    if "output" in base_checkpoint:
        problems.append(Problem("spec.checkpoint.output", "with a pipeline, each step names its own checkpoint.output"))
    first_source = base_checkpoint.pop("source", None)
    base_checkpoint.pop("output", None)

    out: list[tuple[str, dict[str, Any], Any]] = []
    seen: set[str] = set()
    previous_output: dict[str, Any] | None = first_source
    for i, step in enumerate(steps):
        where = f"spec.pipeline[{i}]"
        if not isinstance(step, dict):
            problems.append(Problem(where, "must be a mapping with name and stage"))
            previous_output = None
            continue
        name = step.get("name")
        if name in seen:
            problems.append(Problem(f"{where}.name", f"duplicate step name {name!r}"))
        seen.add(name)
        for key in sorted(set(step) - {"name", "stage", *OVERRIDABLE}):
            problems.append(Problem(f"{where}.{key}", f"a step may override only {', '.join(OVERRIDABLE)}"))
        effective = copy.deepcopy(base)
        for key in OVERRIDABLE:
            if key in step:
                effective[key] = deep_merge(effective.get(key, {}), step[key])
        effective["stage"] = step.get("stage")
        checkpoint = effective.setdefault("checkpoint", {})
        if "source" not in checkpoint and previous_output is not None:
            checkpoint["source"] = copy.deepcopy(previous_output)
        try:
            parsed = validate_stage_spec(effective, prefix=where)
        except SpecError as err:
            problems.extend(err.problems)
            previous_output = None
            continue
        _, output_format = checkpoint_formats(parsed.job_spec())
        previous_output = (
            {"path": parsed.checkpoint.output.path, "format": output_format} if parsed.checkpoint.output else None
        )
        out.append((name, effective, parsed))
    if problems:
        raise SpecError(problems)
    return out
