"""Inputs and outputs: datasets, checkpoints, evaluation."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from .base import AbsolutePath, PositiveInt, SpecModel

CheckpointFormat = Literal["hf", "megatron-lm", "mcore", "torch_dist", "megablocks"]


class DatasetPrefix(SpecModel):
    """One Megatron indexed dataset (path without .bin/.idx) and its blend weight."""

    path: AbsolutePath
    """Prefix of the .bin/.idx pair."""
    weight: float = Field(default=1.0, gt=0)
    """Relative sampling weight in the blend."""


class PretrainData(SpecModel):
    """Megatron .bin/.idx datasets for continued pretraining."""

    prefixes: list[DatasetPrefix] = Field(min_length=1, max_length=64)
    """Datasets and blend weights."""
    split: str = Field(default="99,1,0", pattern=r"^\d+(\.\d+)?,\d+(\.\d+)?,\d+(\.\d+)?$")
    """Train, validation, test proportions."""


class SftData(SpecModel):
    """Alpaca-style JSON (instruction, input, output) rendered with the Qwen ChatML template."""

    train_path: AbsolutePath
    """Training samples (JSON list or JSON lines)."""
    valid_path: Optional[str] = Field(default=None, pattern=r"^/", max_length=4096)
    """Validation samples."""
    packing: bool = False
    """Pack several samples into one sequence (needs microBatchSize 1 and context parallel 1)."""


class Data(SpecModel):
    """Training data; pretraining needs `pretrain`, finetuning needs `sft`."""

    pretrain: Optional[PretrainData] = None
    """Datasets for continued pretraining."""
    sft: Optional[SftData] = None
    """Instruction data for supervised finetuning."""


class CheckpointLocation(SpecModel):
    """A checkpoint directory and its format."""

    path: AbsolutePath
    """Directory of the checkpoint."""
    format: Optional[CheckpointFormat] = None
    """hf, megatron-lm, mcore, torch_dist or megablocks; defaults to the backend's format (hf for export)."""


class Checkpoint(SpecModel):
    """Where weights come from and where they go."""

    source: Optional[CheckpointLocation] = None
    """Checkpoint to start from (conversion input, initial weights, or the model to export or evaluate)."""
    output: Optional[CheckpointLocation] = None
    """Directory the stage writes to."""
    resume: Literal["auto", "never", "require"] = "auto"
    """auto: continue from the newest complete checkpoint in output if there is one; never: always start from source; require: fail without one."""
    save_optimizer: bool = True
    """Save optimizer, scheduler, RNG and data position so a restart continues exactly."""
    load_optimizer: bool = True
    """Restore optimizer state on resume."""
    async_save: bool = True
    """Write training checkpoints in the background (GPU engine's sharded checkpoints): training waits only while the shards are copied off the GPU; the checkpoint counts once every rank's writer is done. false: training waits for the whole save."""
    reshardable_optimizer: bool = False
    """Distributed optimizer: save its state so that a run at another tensor/pipeline/expert parallel split can load it (megatron's 'fully_reshardable' format). The default format ('dp_reshardable') is written by every rank without any exchange and follows a changed data-parallel size only; a resume at another split then starts the optimizer afresh from the checkpoint's weights. The price, at every save: the first data-parallel rank of each model-parallel group gathers that group's whole optimizer state (fp32 weights and Adam moments, 12 bytes a parameter) in host memory over gloo and writes it."""
    verify: bool = False
    """After conversion, re-read the output and compare checksums."""
    overwrite: bool = False
    """Allow a conversion to replace a checkpoint already in the output directory."""
    dtype: Literal["fp32", "bf16", "fp16"] = "bf16"
    """Tensor dtype written by conversion and export."""


class Evaluate(SpecModel):
    """Downstream evaluation with lm-evaluation-harness, or perplexity computed by the trainer."""

    tasks: list[str] = Field(default_factory=list, max_length=64)
    """Task names (e.g. mmlu, ceval-valid, cmmlu, perplexity)."""
    batch_size: PositiveInt = 16
    """Evaluation batch size."""
    num_fewshot: Optional[int] = Field(default=None, ge=0)
    """Few-shot examples per prompt (task default when unset)."""
    limit: Optional[PositiveInt] = None
    """Evaluate at most this many samples per task."""
    include_path: Optional[str] = Field(default=None, pattern=r"^/", max_length=4096)
    """Directory of local task definitions (clusters are often offline)."""
