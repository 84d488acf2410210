"""The background batch reader gives every step exactly the batches of the synchronous path, in any order of
calls, reads ahead only within the run, and hands read errors to the step that needed the data."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from qwen_trainer.data.batches import step_micro_batches
from qwen_trainer.data.prefetch import StepPrefetcher

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


def _sft_source():
    from qwen_trainer.data.sft import SftSource, SftStats

    rows = 7  # a global batch of 8 straddles an epoch every step
    tokens = np.arange(rows * 4, dtype=np.int64).reshape(rows, 4)
    return SftSource(tokens, tokens + 1, np.tile(np.arange(4), (rows, 1)), "sft", SftStats(rows, 0, 0, rows, rows * 4),
                     seed=3)


def test_sft_epochs_shuffle_the_same_when_threads_sample_across_epoch_boundaries():
    from concurrent.futures import ThreadPoolExecutor

    expected = {i: _sft_source().sample(i)["tokens"].tolist() for i in range(70)}
    shared = _sft_source()
    order = [i for k in range(35) for i in (k, 69 - k)]  # alternate between early and late epochs
    with ThreadPoolExecutor(8) as pool:
        got = dict(zip(order, pool.map(lambda i: shared.sample(i)["tokens"].tolist(), order)))
    assert got == expected
    walker = _sft_source()
    for i in range(70):  # ten epochs in order: the cache keeps the current epoch and the one before
        walker.sample(i)
    assert sorted(walker._perms) == [8, 9]


def test_prefetched_sft_steps_equal_the_synchronous_path():
    source = _sft_source()
    with StepPrefetcher(source, GBS, MICRO, DP, 1, workers=3, end=10 * GBS) as feeder:
        for step in range(10):
            assert _same(feeder.get(step * GBS), step_micro_batches(_sft_source(), step * GBS, GBS, MICRO, DP, 1))
