"""This rank's micro-batches of the coming optimiser steps, assembled in the background (training.numWorkers).

A step's batches are slices of memory-mapped token files: on a cold shared volume reading them waits on page
faults, which worker threads overlap with the current step's GPU work (threads, not processes: the batches are
read-only views turned into tensors, nothing worth a copy between processes). Step k's batches are a pure function
of the samples consumed before it, so the order is the same with any number of workers, and after a jump (a
resume) the queue simply restarts there.
"""

from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

from .batches import MicroBatch, SampleSource, step_micro_batches


class StepPrefetcher:
    def __init__(self, source: SampleSource, global_batch: int, micro: int, dp: int, dp_rank: int, workers: int,
                 end: Optional[int] = None):
        """`end`: samples consumed after the last step; nothing at or beyond it is read ahead."""
        self._args = (source, global_batch, micro, dp, dp_rank)
        self._global_batch = global_batch
        self._ahead = workers
        self._end = end
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="batches") if workers > 0 else None
        self._pending: OrderedDict[int, Future] = OrderedDict()

    def _load(self, consumed: int) -> list[MicroBatch]:
        source, global_batch, micro, dp, dp_rank = self._args
        return step_micro_batches(source, consumed, global_batch, micro, dp, dp_rank)

    def get(self, consumed: int) -> list[MicroBatch]:
        """The micro-batches of the step that starts after `consumed` samples."""
        if self._pool is None:
            return self._load(consumed)
        future = self._pending.pop(consumed, None)
        if future is None:  # first call or a jump: what was read ahead is for other steps
            self._drop_pending()
            future = self._pool.submit(self._load, consumed)
        nxt = consumed + self._global_batch * (len(self._pending) + 1)
        while len(self._pending) < self._ahead and (self._end is None or nxt < self._end):
            self._pending[nxt] = self._pool.submit(self._load, nxt)
            nxt += self._global_batch
        return future.result()

    def _drop_pending(self) -> None:
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()

    def close(self) -> None:
        if self._pool is not None:
            self._drop_pending()
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> "StepPrefetcher":
        return self

    def __exit__(self, *_exc) -> None:
        self.close()
