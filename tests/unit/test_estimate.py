"""Sizes `qwenctl explain` reports: the sharded checkpoint per rank and the optimizer memory of MoE experts."""

from __future__ import annotations

import pytest

from qwen_trainer.engines.megatron.testing import job_spec
from qwen_trainer.spec import resolve_architecture
from qwen_trainer.spec.estimate import checkpoint_size, memory_per_gpu, parameter_counts

GIB = 1024**3


def test_checkpoint_is_fourteen_bytes_a_parameter_spread_over_the_ranks():
    arch = resolve_architecture(job_spec("qwen2.5", "1.5B"))
    total, _ = parameter_counts(arch)
    one = checkpoint_size(arch, tensor=1, pipeline=1, expert=1, world=1)
    assert one.total_gib == pytest.approx(total * 14 / GIB, rel=1e-3)
    assert one.per_rank_gib == pytest.approx(one.total_gib, rel=1e-3)
    eight = checkpoint_size(arch, tensor=2, pipeline=2, expert=1, world=8)  # 4 model-parallel ranks x DP 2
    assert eight.total_gib == one.total_gib
    assert eight.per_rank_gib == pytest.approx(one.total_gib / 8, rel=1e-3)
    weights_only = checkpoint_size(arch, tensor=1, pipeline=1, expert=1, world=1, save_optimizer=False)
    assert weights_only.total_gib == pytest.approx(total * 2 / GIB, rel=1e-3)


def test_a_reshardable_optimizer_state_is_gathered_on_one_rank_of_each_model_parallel_group():
    arch = resolve_architecture(job_spec("qwen2.5", "1.5B"))
    total, _ = parameter_counts(arch)
    spread = checkpoint_size(arch, tensor=2, pipeline=1, expert=1, world=8)  # 2 model-parallel ranks x DP 4
    gathered = checkpoint_size(arch, tensor=2, pipeline=1, expert=1, world=8, reshardable_optimizer=True)
    assert gathered.total_gib == spread.total_gib
    # the whole TP shard's fp32 weights and moments, plus its quarter of the shard's bf16 weights
    assert gathered.per_rank_gib == pytest.approx((total / 2 * 12 + total / 8 * 2) / GIB, rel=1e-3)
    assert gathered.per_rank_gib > 3 * spread.per_rank_gib
    one = dict(tensor=1, pipeline=1, expert=1, world=1)  # one rank: nothing to gather from others
    assert checkpoint_size(arch, reshardable_optimizer=True, **one) == checkpoint_size(arch, **one)


def test_qwen3_235b_on_256_gpus_writes_about_twelve_gib_a_rank():
    """The paper check in docs/checkpoints.md: TP 4, PP 8, EP 32 on 256 GPUs."""
    arch = resolve_architecture(job_spec("qwen3", "A22B"))
    size = checkpoint_size(arch, tensor=4, pipeline=8, expert=32, world=256)
    assert 3000 < size.total_gib < 3100  # 235B parameters x 14 bytes
    assert 11 < size.per_rank_gib < 13


def test_distributed_optimizer_splits_expert_state_over_expert_data_parallel_ranks_only():
    arch = resolve_architecture(job_spec("qwen3", "A22B"))
    kw = dict(tensor=4, pipeline=8, expert=32, data_parallel=8, distributed_optimizer=True, micro_batch_size=1,
              seq_length=4096, recompute="none", sequence_parallel=True)
    dp_only = memory_per_gpu(arch, **kw)  # as if experts were split over all 8 data-parallel ranks
    real = memory_per_gpu(arch, expert_data_parallel=1, **kw)
    assert real.optimizer_gib > 5 * dp_only.optimizer_gib
    assert real.weights_gib == dp_only.weights_gib
