"""Where this process sits in megatron's parallel layout, worked out from the spec before any group exists."""

from __future__ import annotations

from typing import Optional

from qwen_trainer.errors import UserError
from qwen_trainer.spec import JobSpec

# megatron-core's formats for the distributed optimizer's sharded state: every rank its own flat range, no exchange,
# loadable at another data-parallel size only; or gathered per model-parallel group into the parameters' shapes,
# loadable at any layout
DP_RESHARDABLE = "dp_reshardable"
FULLY_RESHARDABLE = "fully_reshardable"


def data_parallel_layout(spec: JobSpec, world_size: int, rank: int) -> tuple[int, int]:
    """(data-parallel size, data-parallel rank) of `rank` under megatron's default order tp-cp-ep-dp-pp: the
    tensor- and context-parallel ranks of one model replica are consecutive, data parallel comes next, pipeline
    stages are outermost. Ranks with the same data-parallel rank must read the same micro-batches."""
    p = spec.parallelism
    model_parallel = p.tensor * p.pipeline * p.context
    if world_size % model_parallel:
        raise UserError(f"{world_size} processes do not divide into tensor {p.tensor} x pipeline {p.pipeline} x "
                        f"context {p.context} parallel replicas", path="parallelism")
    dp = world_size // model_parallel
    if (world_size // p.pipeline) % (p.expert * p.expert_tensor):
        raise UserError(f"expert {p.expert} x expert-tensor {p.expert_tensor} parallel size must divide the "
                        f"{world_size // p.pipeline} processes of a pipeline stage", path="parallelism.expert")
    return dp, (rank // (p.tensor * p.context)) % dp


def layout_record(spec: JobSpec, world_size: int) -> dict:
    """The layout a checkpoint was saved at, as its trainer_state records it (compared again at resume)."""
    p = spec.parallelism
    record = {"world": world_size, "tensor": p.tensor, "pipeline": p.pipeline, "context": p.context,
              "expert": p.expert, "virtual_pipeline": p.virtual_pipeline_layers,
              "distributed_optimizer": p.distributed_optimizer}
    if p.distributed_optimizer and spec.checkpoint.reshardable_optimizer:
        record["optimizer_sharding"] = FULLY_RESHARDABLE
    return record


def optimizer_sharding(layout: Optional[dict]) -> str:
    """The format the distributed optimizer's state of a checkpoint saved at `layout` is in (a load must ask for the
    same one)."""
    return (layout or {}).get("optimizer_sharding", DP_RESHARDABLE)
