"""What the training loop needs from an engine.

The loop owns the schedule, the data, logging and checkpoint cadence; an engine owns the model on its device,
the forward/backward over micro-batches, the gradient reduction over data-parallel ranks, clipping and the
optimiser. Weights cross the boundary in Hugging Face naming (`checkpoint_weights` / `load_checkpoint_weights`)
for initial weights and for engines that keep the whole model in every process (the CPU engine): rank 0 writes
them in the backend's Megatron layout through the converter.

An engine whose model is spread over processes (the megatron engine) sets `saves_sharded` and implements
`save_sharded(folder, save_optimizer)` / `load_sharded(folder, load_optimizer) -> bool`: every rank writes and
reads its own shard of weights and optimizer state (qwen_trainer.checkpoint.sharded), and no process gathers the
model. Such an engine may still define `prepare_checkpoint(save_optimizer)` for the gathered path (the checkpoint
benchmark's baseline): it gathers what rank 0's `checkpoint_weights()` / `optimizer_state_dict()` then return.
An engine with model parallelism also decides which processes share micro-batches: the loop reads
`data_parallel_size` and `data_parallel_rank` from any engine other than the CPU one before it shards the data,
so those are set when the engine is created, before `build`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, Sequence

import torch

from qwen_trainer.data.batches import MicroBatch
from qwen_trainer.distenv import DistEnv
from qwen_trainer.spec import JobSpec
from qwen_trainer.spec.resolve import ResolvedArchitecture

# How micro-batch losses combine into the step's loss:
#   "mean"      average over micro-batches and data-parallel ranks of each micro-batch's token-mean loss
#               (Megatron's pretraining default);
#   "per_token" sum over all loss tokens of the global batch divided by their number (Megatron's
#               --calculate-per-token-loss, which the SFT scripts pass).
LossMode = str


@dataclass
class EngineContext:
    spec: JobSpec
    arch: ResolvedArchitecture
    dist: DistEnv
    init_std: float
    seed: int
    log: Callable[[str], None]


@dataclass
class StepResult:
    loss: float  # language-model loss of the global batch
    aux_loss: Optional[float]  # MoE load-balancing loss (unweighted), None for dense models
    grad_norm: float  # before clipping
    loss_tokens: int  # tokens that carried loss, whole global batch


class Engine(Protocol):
    name: str  # "cpu" or "megatron"; logs and status name the engine that ran
    device: str
    data_parallel_size: int
    data_parallel_rank: int
    saves_sharded: bool  # True: every rank saves/loads its own shard (save_sharded / load_sharded)
    notes: list[str]  # after build: what the spec asked for that this engine does not do here, and why

    def build(self, ctx: EngineContext) -> None:
        """Create the model (random init with ctx.init_std and ctx.seed) and the optimiser."""

    def load_checkpoint_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Replace the weights with HF-named full tensors (initial weights or a resume)."""

    def checkpoint_weights(self) -> dict[str, torch.Tensor]:
        """Full weights in HF naming, on CPU (called on the rank that writes the checkpoint)."""

    def hf_config(self) -> Any:
        """The transformers config describing the model (written next to checkpoints, used by export)."""

    def train_step(self, micro_batches: Sequence[MicroBatch], lr: float, loss_mode: LossMode) -> StepResult:
        """Forward/backward over this rank's micro-batches, reduce gradients, clip, step the optimiser."""

    def eval_step(self, micro_batches: Sequence[MicroBatch]) -> tuple[float, int]:
        """(summed loss, loss tokens) over the global batch, no gradients."""

    # Optional: `launch_step(micro_batches, lr, loss_mode)` queues the step and returns an object whose `result()`
    # gives its StepResult later (the megatron engine: read back once the next step is launched; launch_step below).

    def optimizer_state_dict(self) -> dict:
        ...

    def load_optimizer_state_dict(self, state: dict) -> None:
        ...


class ReadyStep:
    """A step whose result is on the host already (engines without `launch_step`)."""

    def __init__(self, result: StepResult):
        self._result = result

    def result(self) -> StepResult:
        return self._result


def launch_step(engine, micro_batches: Sequence[MicroBatch], lr: float, loss_mode: LossMode):
    """The engine's step, launched: an object whose `result()` returns the StepResult, where the engine can leave
    it on the device until then (launch_step), else at once."""
    launch = getattr(engine, "launch_step", None)
    if launch is not None:
        return launch(micro_batches, lr, loss_mode)
    return ReadyStep(engine.train_step(micro_batches, lr, loss_mode))
