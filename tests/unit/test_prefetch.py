"""The background batch reader gives every step exactly the batches of the synchronous path, in any order of
calls, reads ahead only within the run, and hands read errors to the step that needed the data."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from trainer.data.batches import step_micro_batches
from trainer.data.prefetch import StepPrefetcher

GBS, MICRO, DP, SEQ, SAMPLES = 8, 2, 2, 16, 64


class CountingSource:
    name = "counting"

    def __init__(self):
        self.read: list[int] = []
        self.lock = threading.Lock()

    def __len__(self) -> int:
        return SAMPLES

    def sample(self, index: int) -> dict[str, np.ndarray]:
        if index >= SAMPLES:
            raise IndexError(index)
        with self.lock:
            self.read.append(index)
        tokens = (np.arange(SEQ) + index * 1000).astype(np.int64)
        return {"tokens": tokens, "targets": tokens + 1, "position_ids": np.arange(SEQ, dtype=np.int64)}


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x.tokens, y.tokens) and torch.equal(x.targets, y.targets)
                                    and torch.equal(x.position_ids, y.position_ids) for x, y in zip(a, b))


@pytest.mark.parametrize("workers", [0, 1, 3])
@pytest.mark.parametrize("rank", [0, 1])
def test_batches_equal_the_synchronous_path_with_any_worker_count(workers, rank):
    source = CountingSource()
    order = [0, 8, 16, 24, 8, 16, 48, 56]  # in order, then a jump back (a resume), then ahead
    with StepPrefetcher(source, GBS, MICRO, DP, rank, workers, end=SAMPLES) as feeder:
        for consumed in order:
            assert _same(feeder.get(consumed), step_micro_batches(source, consumed, GBS, MICRO, DP, rank))


def test_reads_ahead_while_the_step_runs_but_not_past_the_end():
    source = CountingSource()
    feeder = StepPrefetcher(source, GBS, MICRO, DP, 0, workers=2, end=4 * GBS)
    feeder.get(0)
    feeder._pending[GBS].result()  # the next step was read without being asked for
    feeder._pending[2 * GBS].result()
    assert max(source.read) >= 2 * GBS
    feeder.get(GBS)
    feeder.get(2 * GBS)
    feeder.get(3 * GBS)  # the last step: nothing at or beyond `end` is scheduled
    feeder.close()
    assert max(source.read) < 4 * GBS


def test_a_read_error_reaches_the_caller_of_that_step():
    source = CountingSource()
    with StepPrefetcher(source, GBS, MICRO, DP, 0, workers=2) as feeder:  # no end: reads ahead past the data
        feeder.get(SAMPLES - 2 * GBS)
        feeder.get(SAMPLES - GBS)
        with pytest.raises(IndexError):
            feeder.get(SAMPLES)
