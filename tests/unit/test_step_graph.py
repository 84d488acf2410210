"""The whole-step CUDA graph's host side: which steps it may replay (their key), the device copies of the batches it
reads, and where it is refused. The capture and replay themselves need a GPU: tests/gpu/test_moe_levers.py
(`whole_step_graph`) trains 50 steps with and without it."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("megatron.core")
warnings.filterwarnings("ignore")

from qwen_trainer.data.batches import IGNORE_INDEX, MicroBatch  # noqa: E402
from qwen_trainer.engines.megatron.config import (  # noqa: E402
    Capabilities,
    EngineOptions,
    plan_model,
    whole_step_graph_blocker,
)
from qwen_trainer.engines.megatron.step_graph import (  # noqa: E402
    WASTED_CAPTURES_BEFORE_GIVING_UP,
    DeviceMicroBatch,
    StepGraph,
    after_mismatch,
    graph_action,
    step_key,
)
from qwen_trainer.engines.megatron.testing import job_spec  # noqa: E402
from qwen_trainer.spec import resolve_architecture  # noqa: E402

HOPPER = Capabilities(cuda=True, torch_grouped_mm=True)


def _batch(seq: int = 8, ignored: int = 0, seed: int = 0) -> MicroBatch:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 100, (1, seq), generator=g)
    targets = torch.randint(0, 100, (1, seq), generator=g)
    targets[0, :ignored] = IGNORE_INDEX
    return MicroBatch(tokens, targets, torch.arange(seq).unsqueeze(0))


def test_key_holds_what_the_kernels_bake_in():
    step = [_batch(seed=1), _batch(seed=2)]
    assert step_key(step, "mean", 16) == step_key([_batch(seed=3), _batch(seed=4)], "mean", 16)  # other tokens
    assert step_key(step, "mean", 16).loss_tokens == (8, 8)
    assert step_key(step, "mean", 16) != step_key([_batch(seed=1), _batch(ignored=3)], "mean", 13)
    assert step_key(step, "mean", 16) != step_key(step, "per_token", 16)
    assert step_key(step, "mean", 16) != step_key(step, "mean", 32)  # data-parallel ranks' counts summed
    assert step_key(step, "mean", 16) != step_key([_batch(seq=16), _batch(seq=16)], "mean", 16)
    assert step_key(step, "mean", 16) != step_key(step[:1], "mean", 16)


def test_device_batch_is_filled_in_place_and_keeps_the_host_count():
    first, second = _batch(ignored=2, seed=1), _batch(ignored=2, seed=2)
    dev = DeviceMicroBatch.like(first, "cpu")
    addresses = (dev.tokens.data_ptr(), dev.targets.data_ptr(), dev.position_ids.data_ptr())
    assert dev.loss_tokens == 6 and isinstance(dev.loss_tokens, int)
    for mb in (first, second):
        dev.fill(mb)
        assert torch.equal(dev.tokens, mb.tokens) and torch.equal(dev.targets, mb.targets)
        assert torch.equal(dev.position_ids, mb.position_ids)
    assert (dev.tokens.data_ptr(), dev.targets.data_ptr(), dev.position_ids.data_ptr()) == addresses


def test_first_step_eager_second_captured_then_replayed_while_the_key_matches():
    assert graph_action(captured=False, matches=False, steps_done=0) == "eager"  # compiles and tunes first
    assert graph_action(captured=False, matches=False, steps_done=1) == "capture"
    assert graph_action(captured=False, matches=False, steps_done=7) == "capture"  # e.g. after a reload
    assert graph_action(captured=True, matches=True, steps_done=2) == "replay"
    assert graph_action(captured=True, matches=False, steps_done=9) == "drop"  # then eager, captured again next


def test_nothing_matches_before_a_capture():
    graph = StepGraph()
    key = step_key([_batch()], "mean", 8)
    assert not graph.captured and not graph.matches(key) and graph.replays == 0
    graph.release()
    assert graph.key is None


def _why(spec, opts=EngineOptions(whole_step_graph=True), world: int = 1):
    plan = plan_model(resolve_architecture(spec), spec, opts, HOPPER)
    return whole_step_graph_blocker(spec, plan.options, plan.config_kwargs, plan.attention, plan.experts, world)


NO_RECOMPUTE = {"activationCheckpointing": {"mode": "none"}}


def _spec(family: str, size: str, training: dict = NO_RECOMPUTE, **kw):
    return job_spec(family, size, training=training, **kw)


def test_where_the_whole_step_graph_is_refused():
    assert _why(_spec("qwen1.5", "A2.7B")) is None
    assert _why(_spec("qwen2.5", "0.5B")) is None
    assert _why(_spec("qwen3", "A3B")) is None  # q/k norm's compiled rope: compiled before the capture
    assert "one GPU" in _why(_spec("qwen2.5", "0.5B"), world=2)
    assert "exclude" in _why(_spec("qwen2.5", "0.5B"), EngineOptions(whole_step_graph=True, cuda_graphs=True))
    assert "bf16" in _why(_spec("qwen2.5", "0.5B", {**NO_RECOMPUTE, "precision": "fp16"}))
    assert _why(_spec("qwen2.5", "0.5B", {"activationCheckpointing": {"mode": "selective"}})) is None
    assert "recompute" in _why(_spec("qwen2.5", "0.5B", {"activationCheckpointing": {"mode": "full"}}))
    assert "host" in _why(_spec("qwen1.5", "A2.7B"), EngineOptions(whole_step_graph=True, local_dispatch=False))
    assert "host" in _why(_spec("qwen1.5", "A2.7B", moe={"capacityFactor": 1.5}))
    assert "parallelism" in _why(_spec("qwen2.5", "0.5B", parallelism={"tensor": 2}))


def test_the_spec_turns_the_whole_step_graph_on_and_off_unless_the_options_say():
    def wanted(training: dict, opts: EngineOptions = EngineOptions()):
        spec = _spec("qwen1.5", "A2.7B", {**NO_RECOMPUTE, **training})
        return plan_model(resolve_architecture(spec), spec, opts, HOPPER).options.whole_step_graph

    assert wanted({}) is True  # on by default
    assert wanted({"wholeStepGraph": False}) is False
    assert wanted({"wholeStepGraph": False}, EngineOptions(whole_step_graph=True)) is True  # the benchmark's variants
    assert wanted({}, EngineOptions(whole_step_graph=False)) is False


def test_a_graph_of_another_key_is_dropped_and_capturing_stops_once_captures_go_unused():
    # pretraining: an odd step after replays drops the graph, the next step captures again, nothing is wasted
    assert after_mismatch(replays_since_capture=30, wasted=0) == (0, False)
    # SFT-like batches: every capture meets another key at once
    wasted, give_up = after_mismatch(replays_since_capture=0, wasted=0)
    assert (wasted, give_up) == (1, False)
    assert after_mismatch(replays_since_capture=0, wasted=wasted) == (WASTED_CAPTURES_BEFORE_GIVING_UP, True)
    # a used capture in between does not reset the count of wasted ones, but does not add to it
    assert after_mismatch(replays_since_capture=5, wasted=1) == (1, False)


def test_dropping_for_a_mismatch_releases_the_graph_and_counts_wasted_captures():
    graph = StepGraph()
    graph.key, graph._graph = "captured key", object()  # as after a capture, whose own run is not a reuse
    assert not graph.drop_for_mismatch() and not graph.captured and graph.key is None
    graph.key, graph._graph = "captured key", object()
    assert graph.drop_for_mismatch() and graph.given_up
