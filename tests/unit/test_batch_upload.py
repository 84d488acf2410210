"""The step's micro-batches packed into one host buffer and sent to the device at once (batch_upload): every
tensor comes back equal in shape and value, loss-token counts are the host's, and the buffer is reused."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from qwen_trainer.data.batches import IGNORE_INDEX, MicroBatch  # noqa: E402
from qwen_trainer.engines.megatron.batch_upload import BatchUploader  # noqa: E402


def _batch(b: int, s: int, seed: int, ignored: int = 0) -> MicroBatch:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 1000, (b, s), generator=g)
    targets = torch.randint(0, 1000, (b, s), generator=g)
    targets[:, :ignored] = IGNORE_INDEX
    return MicroBatch(tokens, targets, torch.arange(s).expand(b, s).contiguous())


def test_every_tensor_and_count_survives_the_packing():
    batches = [_batch(2, 16, 0, ignored=3), _batch(2, 16, 1), _batch(1, 8, 2, ignored=8)]
    staged = BatchUploader().upload(batches, "cpu")
    assert len(staged) == len(batches)
    for got, mb in zip(staged, batches):
        for field in ("tokens", "targets", "position_ids"):
            assert torch.equal(getattr(got, field), getattr(mb, field)), field
            assert getattr(got, field).dtype == torch.int64
        assert got.loss_tokens == mb.loss_tokens
    assert [s.loss_tokens for s in staged] == [26, 32, 0]


def test_the_host_buffer_is_reused_and_grown_without_touching_earlier_results():
    up = BatchUploader()
    first = up.upload([_batch(1, 32, 3)], "cpu")
    buffer = up._host
    second = up.upload([_batch(1, 16, 4)], "cpu")
    assert up._host is buffer  # smaller: the same buffer
    assert torch.equal(first[0].tokens, _batch(1, 32, 3).tokens)  # results do not alias the host buffer
    third = up.upload([_batch(2, 64, 5)], "cpu")
    assert up._host.numel() >= 3 * 2 * 64
    assert torch.equal(second[0].tokens, _batch(1, 16, 4).tokens)
    assert torch.equal(third[0].targets, _batch(2, 64, 5).targets)
