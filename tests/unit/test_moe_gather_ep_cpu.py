"""EngineOptions.gather_permute under expert parallelism, in real processes (torchrun, 2 ranks, gloo, CPU):
megatron's all-to-all dispatcher with its local permutation's backward and its unpermutation done by gathers
trains like the stock dispatcher (bf16, losses within 1e-3 relative), and the switch really reached every MoE
layer."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("megatron.core")

from tests.unit.test_megatron_resume_cpu import trained_losses  # noqa: E402

STEPS = 4


def _losses(tmp_path, gather: bool) -> tuple[list[float], list[str]]:
    losses, built = trained_losses(tmp_path, f"gather-{int(gather)}", 2, STEPS, "ep=2", "dispatcher=alltoall",
                                   f"opts={json.dumps({'gather_permute': gather})}")
    return losses, built["dispatchers"]


def test_gathered_alltoall_permutation_trains_like_megatrons(tmp_path):
    stock, stock_dispatchers = _losses(tmp_path, gather=False)
    gathered, gathered_dispatchers = _losses(tmp_path, gather=True)
    assert stock_dispatchers and set(stock_dispatchers) == {"MoEAlltoAllTokenDispatcher"}
    assert len(gathered_dispatchers) == len(stock_dispatchers)
    assert set(gathered_dispatchers) == {"GatherAlltoAllTokenDispatcher"}
    assert len(gathered) == len(stock) == STEPS
    for a, b in zip(gathered, stock):
        assert abs(a - b) <= 1e-3 * abs(b), (gathered, stock)
