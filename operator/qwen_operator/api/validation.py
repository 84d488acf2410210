"""Validation of a whole resource spec: one stage, or a pipeline validated step by step."""

from __future__ import annotations

from typing import Any

from qwen_trainer.spec.problems import parse

from .pipeline import pipeline_steps
from .resource import QwenTrainingJobSpec, validate_stage_spec


def validate_resource_spec(data: Any, prefix: str = "spec") -> QwenTrainingJobSpec:
    """Structural then semantic validation of a resource's spec; raises SpecError naming fields under `prefix`.
    A pipeline is validated step by step (problems name `spec.pipeline[i]...`)."""
    spec = parse(QwenTrainingJobSpec, data, prefix)
    if spec.pipeline is not None:
        pipeline_steps(data)
        return spec
    return validate_stage_spec(data, prefix)
