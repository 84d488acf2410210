"""How the Hugging Face baseline spreads over several GPUs, as a user of transformers would: torch DDP where a
replica of the model and its optimizer state fits one card, FSDP2 (`fully_shard` on every decoder layer, then on
the whole model) where it does not, for example MoE models whose experts megatron spreads with expert
parallelism. Both keep the baseline's single-GPU arithmetic: bf16 weights, fused AdamW, gradients reduced once
per optimiser step (on the last micro-batch)."""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch

MODES = ("ddp", "fsdp")


def baseline_mode(requested: str, world: int) -> str:
    """The baseline's data-parallel wrapper: "single" on one process, else the case's choice ("auto" = DDP)."""
    if world == 1:
        return "single"
    mode = "ddp" if requested == "auto" else requested
    if mode not in MODES:
        raise ValueError(f"baseline must be auto, {' or '.join(MODES)} or none, got {requested!r}")
    return mode


def wrap(model: torch.nn.Module, mode: str, device_id: int | None = None
         ) -> tuple[torch.nn.Module, Callable[[bool], ContextManager]]:
    """(module to call, sync(last) -> context for one micro-batch's forward and backward). Gradients are reduced
    only inside the context of the step's last micro-batch."""
    if mode == "single":
        return model, lambda _last: contextlib.nullcontext()
    if mode == "ddp":
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=None if device_id is None else [device_id], gradient_as_bucket_view=True)
        return net, lambda last: contextlib.nullcontext() if last else net.no_sync()
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in _decoder_layers(model):
            fully_shard(layer)
        fully_shard(model)

        @contextlib.contextmanager
        def sync(last: bool):
            model.set_requires_gradient_sync(last)
            yield

        return model, sync
    raise ValueError(f"unknown baseline mode {mode!r}")


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no model.layers to shard")
    return list(layers)
