"""How the model is split over GPUs."""

from __future__ import annotations

from typing import Optional

from .base import PositiveInt, SpecModel


class Parallelism(SpecModel):
    """Model-parallel layout. Data parallelism takes the remaining GPUs."""

    tensor: PositiveInt = 1
    """Tensor-parallel size (TP)."""
    pipeline: PositiveInt = 1
    """Pipeline-parallel size (PP)."""
    virtual_pipeline_layers: Optional[PositiveInt] = None
    """Layers per virtual pipeline stage (interleaved schedule); needs pipeline > 1."""
    first_stage_layers: Optional[PositiveInt] = None
    """Layers on the first pipeline stage when it differs from the rest; needs pipeline > 1."""
    context: PositiveInt = 1
    """Context-parallel size (CP): splits the sequence dimension."""
    expert: PositiveInt = 1
    """Expert-parallel size (EP)."""
    expert_tensor: PositiveInt = 1
    """Tensor-parallel size inside experts (ETP)."""
    sequence_parallel: bool = False
    """Sequence parallelism for norms and dropout; needs tensor > 1."""
    distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks (ZeRO-1)."""
    overlap_grad_reduce: bool = True
    """Overlap the gradient reduce-scatter with the backward pass."""
    overlap_param_gather: bool = True
    """Overlap the parameter all-gather with the forward pass (distributed optimizer only)."""
    tp_comm_overlap: bool = False
    """Overlap tensor-parallel communication with GEMMs (Transformer Engine only; not carried out by this trainer
    yet, so a resource that sets it is refused)."""
