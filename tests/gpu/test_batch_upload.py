"""The step's micro-batches reach the GPU through a pinned buffer without the host waiting for work queued
before them (a copy from pageable memory would wait; batch_upload)."""

from __future__ import annotations

import time

import pytest

torch = pytest.importorskip("torch")

from qwen_trainer.engines.megatron.batch_upload import BatchUploader  # noqa: E402
from qwen_trainer.engines.megatron.testing import random_micro_batches  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _busy_gpu(seconds: float) -> None:
    """Queue about `seconds` of GPU work the host does not wait for."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(1_000_000)
    end.record()
    end.synchronize()
    per_call = start.elapsed_time(end) / 1e3
    torch.cuda._sleep(int(1_000_000 * seconds / per_call))


def test_upload_does_not_wait_for_queued_work_and_arrives_intact():
    batches = random_micro_batches(4, 1, 4096, 151936, seed=7, ignore_first=5)
    up = BatchUploader()
    up.upload(batches, "cuda")  # the pinned buffer is allocated outside the timing
    torch.cuda.synchronize()
    _busy_gpu(0.5)
    t0 = time.perf_counter()
    staged = up.upload(batches, "cuda")
    host_s = time.perf_counter() - t0
    assert up._host.is_pinned()
    assert host_s < 0.1, f"the upload held the host {host_s:.3f} s behind 0.5 s of queued GPU work"
    for got, mb in zip(staged, batches):
        assert got.tokens.is_cuda and got.loss_tokens == mb.loss_tokens
        assert torch.equal(got.tokens.cpu(), mb.tokens)
        assert torch.equal(got.targets.cpu(), mb.targets)
        assert torch.equal(got.position_ids.cpu(), mb.position_ids)


def test_pageable_copies_would_wait():
    """The premise: a copy from pageable memory holds the host until queued work is done."""
    mb = random_micro_batches(1, 1, 4096, 151936, seed=8)[0]
    torch.cuda.synchronize()
    _busy_gpu(0.5)
    t0 = time.perf_counter()
    mb.tokens.to("cuda", non_blocking=True)
    host_s = time.perf_counter() - t0
    torch.cuda.synchronize()
    assert host_s > 0.3, f"a pageable copy returned after {host_s:.3f} s with 0.5 s of GPU work queued"
