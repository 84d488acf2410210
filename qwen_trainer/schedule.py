"""Learning-rate schedule and step arithmetic, as Megatron computes them.

Megatron's `OptimizerParamScheduler` starts at step 0 and advances after each optimiser step, so iteration `i`
(1-based) trains with `lr_at(i - 1)`: with warmup the first update uses lr 0. Warmup is linear from 0 to the
peak; then cosine `min + (max - min) * 0.5 * (1 + cos(pi * r))` or linear `min + (max - min) * (1 - r)` with
`r = (step - warmup) / (decay - warmup)`; after `decay` steps the lr stays at `min_lr`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

from qwen_trainer.errors import UserError
from qwen_trainer.spec import JobSpec, derive


@dataclass(frozen=True)
class LRSchedule:
    max_lr: float
    min_lr: float
    warmup_steps: int
    decay_steps: int
    style: str  # cosine | linear | constant

    def lr_at(self, step: int) -> float:
        if self.warmup_steps > 0 and step <= self.warmup_steps:
            return self.max_lr * step / self.warmup_steps
        if self.style == "constant":
            return self.max_lr
        if step > self.decay_steps:
            return self.min_lr
        span = self.decay_steps - self.warmup_steps
        if span <= 0:
            return self.min_lr
        ratio = (step - self.warmup_steps) / span
        if self.style == "linear":
            coeff = 1.0 - ratio
        elif self.style == "cosine":
            coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        else:
            raise ValueError(f"unknown decay style {self.style}")
        return self.min_lr + coeff * (self.max_lr - self.min_lr)

    def lr_for_iteration(self, iteration: int) -> float:
        """The lr an optimiser step numbered `iteration` (1-based) uses."""
        return self.lr_at(iteration - 1)

    def state_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class StepPlan:
    """How one optimiser step is cut into micro-batches over data-parallel ranks."""

    global_batch_size: int
    micro_batch_size: int
    data_parallel_size: int
    seq_length: int
    train_iters: int
    schedule: LRSchedule

    @property
    def grad_accumulation(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.data_parallel_size)

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_length


def plan(spec: JobSpec, data_parallel_size: int, num_train_samples: Optional[int] = None) -> StepPlan:
    """Iterations and warmup/decay from `qwen_trainer.spec.derive`; epochs need the number of training samples."""
    t = spec.training
    mbs_dp = t.micro_batch_size * data_parallel_size
    if t.global_batch_size % mbs_dp:
        raise UserError(
            f"global batch size {t.global_batch_size} must be a multiple of micro batch {t.micro_batch_size} "
            f"x data parallel size {data_parallel_size}", path="training.globalBatchSize")
    d = derive(spec)
    iters, warmup, decay = d.train_iters, d.warmup_iters, d.decay_iters
    if d.schedule_basis == "epochs":
        if not num_train_samples:
            raise UserError("epochs need a dataset with at least one sample", path="training.epochs")
        per_epoch = num_train_samples // t.global_batch_size
        if per_epoch == 0:
            raise UserError(
                f"the training set has {num_train_samples} samples, fewer than one global batch of "
                f"{t.global_batch_size}", path="training.globalBatchSize")
        iters = t.epochs * per_epoch
        decay = max(iters - warmup, 0)
    if not iters:
        raise UserError("the schedule gives zero training iterations", path="training")
    schedule = LRSchedule(t.lr, t.min_lr, warmup, decay if decay is not None else iters, d.lr_decay_style)
    return StepPlan(t.global_batch_size, t.micro_batch_size, data_parallel_size, t.seq_length, iters, schedule)
