"""From a sample source to this rank's micro-batches of one optimiser step.

A sample is three equal-length int64 arrays: `tokens` (model input), `targets` (the next token at each position,
-100 where no loss is taken) and `position_ids`. A source maps a global sample index to a sample; the data
position of a run is just the number of samples consumed so far, so a restart continues exactly.

Order follows Megatron's pretraining sampler: the global batch is read in micro-steps of `micro x dp`
consecutive samples, and data-parallel rank r takes the r-th `micro` of each micro-step.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

import numpy as np
import torch

IGNORE_INDEX = -100


class SampleSource(Protocol):
    name: str

    def __len__(self) -> int: ...

    def sample(self, index: int) -> dict[str, np.ndarray]: ...


@dataclass
class MicroBatch:
    tokens: torch.Tensor  # [b, s] int64
    targets: torch.Tensor  # [b, s] int64, IGNORE_INDEX where no loss
    position_ids: torch.Tensor  # [b, s] int64

    @cached_property  # read several times a step (loss normalisation, the whole-step graph's key); targets never change
    def loss_tokens(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())

    @property
    def num_tokens(self) -> int:
        return self.tokens.numel()


def collate(samples: list[dict[str, np.ndarray]]) -> MicroBatch:
    def stack(key):
        return torch.from_numpy(np.stack([s[key] for s in samples]).astype(np.int64))

    return MicroBatch(stack("tokens"), stack("targets"), stack("position_ids"))


def step_indices(consumed: int, global_batch: int, micro: int, dp: int, dp_rank: int) -> list[list[int]]:
    """Global sample indices of each of this rank's micro-batches for the step starting at `consumed`."""
    steps = global_batch // (micro * dp)
    out = []
    for k in range(steps):
        start = consumed + k * micro * dp + dp_rank * micro
        out.append(list(range(start, start + micro)))
    return out


def step_micro_batches(source: SampleSource, consumed: int, global_batch: int, micro: int, dp: int,
                       dp_rank: int) -> list[MicroBatch]:
    return [collate([source.sample(i) for i in idx])
            for idx in step_indices(consumed, global_batch, micro, dp, dp_rank)]
