"""Learning-rate schedule (Megatron's formulas), step arithmetic and data-parallel micro-batch order."""

from __future__ import annotations

import math

import pytest

from qwen_trainer.data.batches import step_indices
from qwen_trainer.errors import UserError
from qwen_trainer.schedule import LRSchedule, plan
from qwen_trainer.spec import load_job_spec


def test_warmup_then_cosine_to_min():
    s = LRSchedule(1e-3, 1e-4, warmup_steps=10, decay_steps=110, style="cosine")
    assert s.lr_for_iteration(1) == 0.0  # Megatron's first update runs at step 0 of the warmup
    assert s.lr_at(5) == pytest.approx(5e-4)
    assert s.lr_at(10) == pytest.approx(1e-3)
    assert s.lr_at(60) == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi * 0.5)) * 9e-4)
    assert s.lr_at(110) == pytest.approx(1e-4)
    assert s.lr_at(500) == 1e-4


def test_linear_and_constant():
    lin = LRSchedule(1.0, 0.0, 0, 100, "linear")
    assert lin.lr_at(0) == 1.0 and lin.lr_at(25) == pytest.approx(0.75) and lin.lr_at(100) == 0.0
    const = LRSchedule(0.5, 0.1, 4, 100, "constant")
    assert const.lr_at(2) == pytest.approx(0.25) and const.lr_at(50) == 0.5


def _spec(training: dict, stage: str = "pretrain") -> object:
    data = {"pretrain": {"prefixes": [{"path": "/d"}]}} if stage == "pretrain" else {"sft": {"trainPath": "/s.json"}}
    return load_job_spec({"stage": stage, "model": {"family": "qwen2.5", "size": "0.5B"}, "training": training,
                          "data": data, "checkpoint": {"output": {"path": "/o"}}})


def test_plan_from_tokens_matches_the_scripts():
    spec = _spec({"globalBatchSize": 8, "seqLength": 128, "trainTokens": 8 * 128 * 50 + 7, "warmupTokens": 8 * 128 * 5})
    p = plan(spec, data_parallel_size=2)
    assert (p.train_iters, p.schedule.warmup_steps, p.schedule.decay_steps) == (50, 5, 50)
    assert p.grad_accumulation == 4 and p.tokens_per_step == 1024
    assert p.schedule.style == "cosine"


def test_plan_iterations_decay_stops_warmup_early_and_epochs():
    p = plan(_spec({"globalBatchSize": 4, "trainIters": 100, "warmupIters": 10}), 1)
    assert (p.train_iters, p.schedule.decay_steps) == (100, 90)
    e = plan(_spec({"globalBatchSize": 4, "epochs": 3, "warmupIters": 1}, stage="finetune"), 2, num_train_samples=42)
    assert e.train_iters == 3 * (42 // 4) and e.schedule.decay_steps == e.train_iters - 1
    with pytest.raises(UserError, match="globalBatchSize"):
        plan(_spec({"globalBatchSize": 6, "trainIters": 10}), 4)


def test_micro_batches_partition_the_global_batch_in_megatron_order():
    gbs, mbs, dp = 8, 2, 2
    per_rank = [step_indices(16, gbs, mbs, dp, r) for r in range(dp)]
    assert per_rank[0] == [[16, 17], [20, 21]] and per_rank[1] == [[18, 19], [22, 23]]
    flat = sorted(i for rank in per_rank for mb in rank for i in mb)
    assert flat == list(range(16, 24))
