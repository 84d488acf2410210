"""The job spec: everything a stage needs, with no Kubernetes in it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import SpecModel
from .io import Checkpoint, Data, Evaluate
from .model import ModelSpec
from .parallelism import Parallelism
from .training import Training

Stage = Literal["convert", "pretrain", "finetune", "export", "evaluate"]


class JobSpec(SpecModel):
    """One stage of a Qwen training workflow."""

    stage: Stage
    """convert (HF -> Megatron format), pretrain (continued pretraining), finetune (SFT), export (Megatron -> HF) or evaluate."""
    model: ModelSpec
    """Model family, size, backend and architecture."""
    parallelism: Parallelism = Field(default_factory=Parallelism)
    """Tensor, pipeline, context and expert parallel layout."""
    training: Training = Field(default_factory=Training)
    """Batch sizes, schedule, optimiser, precision and intervals."""
    data: Data = Field(default_factory=Data)
    """Training data."""
    checkpoint: Checkpoint = Field(default_factory=Checkpoint)
    """Checkpoint source, output and resume policy."""
    evaluate: Evaluate = Field(default_factory=Evaluate)
    """Evaluation tasks (evaluate stage)."""
